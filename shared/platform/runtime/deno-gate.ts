// Mutual TLS on Deno with the caller's certificate in hand and HTTP parsed by Deno.serve. Deno.serve cannot ask for
// a client certificate (denoland/deno#26825); node:https can, but parses HTTP in JavaScript: on Deno 2.9.6, with 16
// keep-alive streams of a small answer, it took 115–122 µs of the listener's CPU per request against 50–63 µs
// through this gate. Here node:tls terminates TLS and admission.ts decides on the certificate; each admitted
// connection is relayed over a loopback connection of its own to a Deno.serve on 127.0.0.1, whose source port names
// the verified peer, as on Bun (bun-gate.ts).
//
// Deno.serve keeps no deadline for a head or a body (a header byte every 2 s held a connection for over 70 s), and no
// bound on a body. So the relay watches where each request head ends, as far as deadlines need it, and keeps the
// node listener's: the handshake and the head within HEADER_DEADLINE_MS of the accept or of the last answer byte,
// a head of at most MAX_HEAD_BYTES, the first answer byte within BODY_DEADLINE_MS of the head (else a 408), at most
// `bodyLimit` bytes after a head before the app answers (else a 413), and IDLE_TIMEOUT_S of silence. It reads no
// header and decides nothing on one: what a request is, is Deno.serve's to parse and the app's to decide.
import net from "node:net";
import tls from "node:tls";
import { ConfigError } from "../errors.ts";
import { type Admission, CAP_ANSWER_WITHIN_MS, plainAddress, refusalAnswer } from "./admission.ts";
import { rawAnswer, rawRefusal } from "./gate-answer.ts";
import { BODY_DEADLINE_MS, HANDSHAKE_DEADLINE_MS, HEADER_DEADLINE_MS, IDLE_TIMEOUT_S } from "./limits.ts";
import { bindPeer, type RequestPeer } from "./peer.ts";
import type { ReloadableListener, ServerTls } from "./types.ts";

/** The largest request head, as node:https's maxHeaderSize on this listener before. */
export const MAX_HEAD_BYTES = 16 * 1024;
/** How long a request sent by a client that has gone may keep its loopback connection, waiting for the app. */
const ANSWER_BOUND_MS = 60_000;
/** Where the relays' loopback connections come from; the inner server serves no other address. */
const RELAY_SOURCE_ADDRESS = "127.0.0.1";
const HEAD_END = Buffer.from("\r\n\r\n");

/** What this module needs of Deno.serve (the repository type-checks against Bun's types, not Deno's). */
interface DenoHttpServer {
  addr: { port: number };
  finished: Promise<void>;
  shutdown(): Promise<void>;
}
interface DenoServe {
  serve(
    options: { port: number; hostname: string; signal: AbortSignal; onListen: () => void; onError: () => Response },
    handler: (request: Request, info: { remoteAddr: { hostname: string; port: number } }) => Response | Promise<Response>,
  ): DenoHttpServer;
}

export interface DenoGateOptions {
  port: number;
  hostname: string;
  tls: ServerTls;
  admission: Admission;
  handle: (request: Request) => Promise<Response>;
  /** Bytes a request may send after its head before the app answers: the backstop behind the app's own 413. */
  bodyLimit: number;
  /** Default HEADER_DEADLINE_MS and BODY_DEADLINE_MS (limits.ts); shorter in tests. */
  headerDeadlineMs?: number;
  bodyDeadlineMs?: number;
}

/** One TLS connection and, once admitted, its loopback twin. */
interface Relay {
  /** The TCP socket as accepted: destroying it ends the connection whatever TLS did. */
  raw: net.Socket;
  outer: tls.TLSSocket | null;
  inner: net.Socket | null;
  /** The loopback connection's source port, kept from its connect: a closed socket may no longer say it. */
  innerPort: number;
  peer: RequestPeer | null;
  address: string;
  /** Bytes from the client before the loopback connection was up (one chunk: the client is paused meanwhile). */
  early: Buffer[];
  leaveHandshake: () => void;
  handshakeTimer: ReturnType<typeof setTimeout> | undefined;
  /** The handshake and a request head, or the next head after an answer, are due by then. */
  headTimer: ReturnType<typeof setTimeout> | undefined;
  /** The app's first answer byte is due by then, once a head is in. */
  answerTimer: ReturnType<typeof setTimeout> | undefined;
  /** Between an answer and the end of the next head: client bytes are scanned for the head's end. */
  inHead: boolean;
  headBytes: number;
  /** The last bytes of the head so far, for an end split across two chunks. */
  headTail: Buffer;
  /** Bytes after the head, until the app answers. */
  requestBytes: number;
  /** Bytes went to the app and no answer byte came back yet. */
  awaitingAnswer: boolean;
  outerGone: boolean;
  closed: boolean;
}

/** The client's request ends its head in `chunk` (with what came before it): the offset after the head, or -1. */
function headEnd(relay: Relay, chunk: Buffer): number {
  const tail = relay.headTail;
  const joined = tail.length > 0 ? Buffer.concat([tail, chunk]) : chunk;
  const at = joined.indexOf(HEAD_END);
  if (at < 0) {
    relay.headTail = Buffer.from(joined.subarray(Math.max(0, joined.length - 3)));
    return -1;
  }
  relay.headTail = Buffer.alloc(0);
  return at + HEAD_END.length - tail.length;
}

/**
 * Serves `handle` over mutual TLS at `options.port`: TLS and the admission decision in node:tls, HTTP in a loopback
 * Deno.serve. reload() swaps the TLS material for new connections; revocation is asked on every request.
 */
export async function serveThroughDenoGate(options: DenoGateOptions): Promise<ReloadableListener> {
  const { admission } = options;
  const headerDeadlineMs = options.headerDeadlineMs ?? HEADER_DEADLINE_MS;
  const bodyDeadlineMs = options.bodyDeadlineMs ?? BODY_DEADLINE_MS;
  const deno = (globalThis as unknown as { Deno: DenoServe }).Deno;
  /** Relays by the source port of their loopback connection: how a request in Deno.serve finds its TLS peer. */
  const byInnerPort = new Map<number, Relay>();
  /** Accepted connections by address and port, from the TCP accept until the handshake is decided. */
  const accepting = new Map<string, Relay>();
  const relays = new Set<Relay>();
  const keyOf = (socket: net.Socket) => `${socket.remoteAddress}|${socket.remotePort}`;

  const shutdown = new AbortController();
  const inner = deno.serve(
    {
      port: 0,
      hostname: RELAY_SOURCE_ADDRESS,
      signal: shutdown.signal,
      onListen() {}, // Deno.serve would print its address on stdout
      // The app logs its own failures; this is the last resort, without the stack Deno.serve would print.
      onError: () =>
        new Response(JSON.stringify({ error: "internal error", code: "ERR_INTERNAL" }), { status: 500, headers: { "content-type": "application/json" } }),
    },
    (request, info) => {
      const source = info.remoteAddr;
      // The relays connect from 127.0.0.1; from another loopback address any local user could borrow a relay's
      // port, so the address counts too (issue 18 attacker, F1).
      const relay = source.hostname === RELAY_SOURCE_ADDRESS ? byInnerPort.get(source.port) : undefined;
      if (!relay?.peer || relay.closed) return refusal(421, "connect through the TLS port", "ERR_FORBIDDEN");
      // Per request, not per handshake: a certificate revoked while its connection is open is refused on its next
      // request; node:tls on Deno ignores the `crl` option, so this and the handshake's are the only checks.
      if (admission.isRevoked(relay.peer.serial)) return refusal(403, "certificate revoked", "ERR_REVOKED");
      return options.handle(bindPeer(request, relay.peer));
    },
  );
  const innerPort = inner.addr.port;

  /** Cuts both sides now and gives back the identity's place. */
  const close = (relay: Relay) => {
    if (relay.closed) return;
    relay.closed = true;
    relays.delete(relay);
    for (const timer of [relay.handshakeTimer, relay.headTimer, relay.answerTimer]) clearTimeout(timer);
    relay.leaveHandshake();
    // A port left in the map would name this peer to whoever connects from it next (issue 18 attacker, F1).
    if (byInnerPort.get(relay.innerPort) === relay) byInnerPort.delete(relay.innerPort);
    relay.inner?.destroy();
    relay.outer?.destroy();
    relay.raw.destroy();
    if (relay.peer) admission.released(relay.peer);
  };

  /**
   * Answers with the gate's own JSON error, then closes. The app has finished its answer to the request before (a
   * client that waits for each answer sends its next head only then), or has sent no more than a 100 Continue.
   */
  const answerAndClose = (relay: Relay, status: number, error: string, code: "ERR_TIMEOUT" | "ERR_BODY_TOO_LARGE" | "ERR_BAD_REQUEST") => {
    if (relay.outer && !relay.outerGone && !relay.closed) {
      relay.inner?.destroy();
      relay.outer.end(rawAnswer(status, error, code), () => close(relay));
      setTimeout(() => close(relay), CAP_ANSWER_WITHIN_MS).unref?.();
      return;
    }
    close(relay);
  };

  const expectHead = (relay: Relay, ms: number) => {
    clearTimeout(relay.headTimer);
    relay.headTimer = setTimeout(() => close(relay), ms);
  };

  /** The client's bytes, on their way to the app: where a head ends, and the bounds. False: the relay was closed. */
  const watchRequest = (relay: Relay, chunk: Buffer): boolean => {
    let body = chunk.length;
    if (relay.inHead) {
      const end = headEnd(relay, chunk);
      if (end < 0) {
        relay.headBytes += chunk.length;
        if (relay.headBytes > MAX_HEAD_BYTES) {
          answerAndClose(relay, 431, `request head over the ${MAX_HEAD_BYTES}-byte limit`, "ERR_BAD_REQUEST");
          return false;
        }
        return true;
      }
      if (relay.headBytes + end > MAX_HEAD_BYTES) {
        answerAndClose(relay, 431, `request head over the ${MAX_HEAD_BYTES}-byte limit`, "ERR_BAD_REQUEST");
        return false;
      }
      relay.inHead = false;
      relay.headBytes = 0;
      relay.requestBytes = 0;
      clearTimeout(relay.headTimer);
      clearTimeout(relay.answerTimer);
      relay.answerTimer = setTimeout(() => answerAndClose(relay, 408, "request body not received in time", "ERR_TIMEOUT"), bodyDeadlineMs);
      body = chunk.length - end;
    }
    relay.requestBytes += body;
    if (relay.requestBytes > options.bodyLimit) {
      answerAndClose(relay, 413, `request body over the ${options.bodyLimit}-byte limit`, "ERR_BODY_TOO_LARGE");
      return false;
    }
    return true;
  };

  /** The app's bytes, on their way to the client: an answer has begun, and the next head is due. */
  const watchAnswer = (relay: Relay, chunk: Buffer) => {
    relay.awaitingAnswer = false;
    clearTimeout(relay.answerTimer);
    // An interim answer (100 Continue) alone leaves the request's body to come.
    if (chunk.length < 64 && chunk.subarray(0, 10).toString("latin1") === "HTTP/1.1 1" && chunk.indexOf(HEAD_END) === chunk.length - 4) return;
    relay.inHead = true;
    expectHead(relay, headerDeadlineMs);
  };

  const connectInner = (relay: Relay) => {
    // No Nagle delay on either side: an answer's last small write waited for the client's delayed ACK.
    const socket = net.connect({ port: innerPort, host: RELAY_SOURCE_ADDRESS, noDelay: true });
    relay.inner = socket;
    socket.on("error", () => {});
    socket.once("connect", () => {
      if (relay.closed) return void socket.destroy();
      if (socket.localPort === undefined) return close(relay);
      relay.innerPort = socket.localPort;
      byInnerPort.set(relay.innerPort, relay);
      for (const chunk of relay.early) socket.write(chunk);
      relay.early = [];
      relay.outer?.resume();
    });
    socket.on("data", (chunk: Buffer) => {
      if (relay.outerGone) return close(relay); // the app answered a client that is gone: nothing to pass on
      watchAnswer(relay, chunk);
      if (!relay.outer!.write(chunk)) {
        socket.pause();
        relay.outer!.once("drain", () => socket.resume());
      }
      return undefined;
    });
    // The app closed (Connection: close, a shutdown): the client's side ends once what is queued for it is out.
    socket.once("close", () => {
      if (relay.outerGone || !relay.outer) return close(relay);
      relay.outer.end(() => close(relay));
      setTimeout(() => close(relay), CAP_ANSWER_WITHIN_MS).unref?.();
      return undefined;
    });
  };

  /**
   * The client closed its side. A request it sent in full still reaches the app, as on Bun (bun-gate.ts): while one
   * may be in the app's hands, the loopback connection, whose source port names the peer, stays open until the app
   * answers (the answer goes nowhere) or the bound passes.
   */
  const clientClosed = (relay: Relay) => {
    if (relay.outerGone) return;
    relay.outerGone = true;
    if (relay.closed) return;
    const pending = relay.peer !== null && (relay.awaitingAnswer || relay.early.length > 0);
    if (!pending) return close(relay);
    for (const timer of [relay.headTimer, relay.answerTimer]) clearTimeout(timer);
    setTimeout(() => close(relay), ANSWER_BOUND_MS).unref?.();
  };

  const onSecure = (outer: tls.TLSSocket) => {
    const relay = accepting.get(keyOf(outer));
    if (!relay) return void outer.destroy();
    accepting.delete(keyOf(outer));
    relay.outer = outer;
    clearTimeout(relay.handshakeTimer);
    relay.leaveHandshake();
    outer.on("error", () => {});
    outer.once("close", () => clientClosed(relay));
    // Inactivity while a request is read or answered; the deadlines bound the head and the body.
    outer.setTimeout(IDLE_TIMEOUT_S * 1000, () => close(relay));
    const decision = admission.admit(relay.address, outer.authorized, outer.getPeerCertificate());
    if ("refusal" in decision) {
      const answer = refusalAnswer(decision.refusal);
      if (!answer) return close(relay);
      // A refusal the client can act on: its first request gets the reason (a 429, a 403), then a close.
      outer.once("data", () => outer.end(rawRefusal(answer), () => close(relay)));
      setTimeout(() => close(relay), CAP_ANSWER_WITHIN_MS).unref?.();
      return undefined;
    }
    relay.peer = decision.peer;
    outer.on("data", (chunk: Buffer) => {
      if (relay.closed || !watchRequest(relay, chunk)) return;
      relay.awaitingAnswer = true;
      const socket = relay.inner!;
      if (relay.innerPort < 0) {
        // The loopback connection is still being made: keep the bytes, and take no more until it is up.
        relay.early.push(chunk);
        outer.pause();
        return;
      }
      if (!socket.write(chunk)) {
        outer.pause();
        socket.once("drain", () => outer.resume());
      }
    });
    connectInner(relay);
    return undefined;
  };

  const listen = (material: ServerTls) =>
    // rejectUnauthorized off: rustls would end a handshake whose certificate is ours but not for client
    // authentication with an alert, before the client could be told why (issue 23). Nothing is admitted on that:
    // admission.admit() refuses every connection the stack did not authorize.
    tls.createServer({ cert: material.cert, key: material.key, ca: material.ca, requestCert: true, rejectUnauthorized: false }, onSecure);

  const server = listen(options.tls);
  server.on("tlsClientError", () => {}); // a refused handshake is the point, not an error to crash on
  // The deadlines start at the TCP accept, so a stalled handshake is cut off too.
  server.on("connection", (raw: net.Socket) => {
    raw.on("error", () => {});
    raw.setNoDelay(true);
    const address = plainAddress(raw.remoteAddress);
    const relay: Relay = {
      raw,
      outer: null,
      inner: null,
      innerPort: -1,
      peer: null,
      early: [],
      leaveHandshake: () => {},
      handshakeTimer: undefined,
      headTimer: undefined,
      answerTimer: undefined,
      inHead: true,
      headBytes: 0,
      headTail: Buffer.alloc(0),
      requestBytes: 0,
      awaitingAnswer: false,
      outerGone: false,
      closed: false,
      address,
    };
    relays.add(relay);
    const key = keyOf(raw);
    accepting.set(key, relay);
    relay.leaveHandshake = admission.handshakeStarted(address, () => close(relay));
    relay.handshakeTimer = setTimeout(() => {
      admission.handshakeTimedOut(address);
      close(relay);
    }, HANDSHAKE_DEADLINE_MS);
    expectHead(relay, headerDeadlineMs);
    raw.once("close", () => {
      if (accepting.get(key) === relay) accepting.delete(key);
      if (!relay.outer) close(relay);
    });
  });

  await new Promise<void>((resolve, reject) => {
    server.once("error", (error: NodeJS.ErrnoException) => {
      shutdown.abort();
      reject(
        error.code === "EADDRINUSE"
          ? new ConfigError(`port ${options.port} on ${options.hostname} is already in use`)
          : new ConfigError(`cannot listen on ${options.hostname}:${options.port}: ${error.message}`),
      );
    });
    server.listen(options.port, options.hostname, () => {
      server.on("error", () => {}); // after the bind, nothing a client does is the listener's error
      resolve();
    });
  });

  let listenerClosed: Promise<void> | undefined;
  let innerDrained: Promise<void> | undefined;
  return {
    port: (server.address() as net.AddressInfo).port,
    loopbackPort: innerPort,
    async reload(next) {
      try {
        server.setSecureContext({ cert: next.cert, key: next.key, ca: next.ca });
        admission.trust(next.ca);
      } catch (error) {
        throw new ConfigError(`cannot load the new TLS material: ${error instanceof Error ? error.message : String(error)}`);
      }
    },
    // Only an explicit false drains, as on Deno's node listener: a stop that names nothing closes every connection.
    // A drain's stop(false) may be followed by a stop(true) at its deadline: each step is done once.
    async stop(closeActiveConnections) {
      listenerClosed ??= new Promise<void>((done) => server.close(() => done()));
      if (closeActiveConnections !== false) {
        for (const relay of [...relays]) close(relay);
        // Not after a drain's shutdown: aborting a server that has shut down throws from inside Deno (BadResource).
        if (!innerDrained && !shutdown.signal.aborted) shutdown.abort();
      } else {
        // A drain: requests in flight are answered, idle connections closed, and each relay ends with its twin.
        innerDrained ??= inner.shutdown().catch(() => {});
        await innerDrained;
      }
      await inner.finished.catch(() => {});
      await listenerClosed;
    },
  };
}

function refusal(status: number, error: string, code: string): Response {
  return new Response(JSON.stringify({ error, code }), {
    status,
    headers: { "content-type": "application/json; charset=utf-8", connection: "close" },
  });
}
