// Mutual TLS on Bun with the caller's certificate in hand. Bun.serve enforces client certificates but hides them
// (oven-sh/bun#14097), so no role on it could tell who holds a connection: the servers took the coordinator's word
// from a bearer assertion, a revoked certificate kept its open connections, and nothing capped one identity's
// connections (issue 18, H1, L1, L2). Here Bun.listen terminates TLS (BoringSSL, as in Bun.serve) and sees the
// certificate; Bun.serve, on a loopback port of its own, parses HTTP for the Elysia app. Each TLS connection is
// relayed over one loopback connection of its own, whose source port names the verified peer, so every request
// reaches the app with that peer bound to it (peer.ts), and is refused when it is revoked.
//
// Cost, measured on 1.4.5 with 16 keep-alive streams: 25 against 11 µs of the listener's CPU per small request,
// about a third of what node:tls + node:http cost here, and Bun.serve still parses every request.
import type { Server, Socket, TCPSocketListener } from "bun";
import { ConfigError } from "../errors.ts";
import { type Admission, CAP_ANSWER_WITHIN_MS, plainAddress, refusalAnswer, type RefusalAnswer } from "./admission.ts";
import { rawRefusal } from "./gate-answer.ts";
import { bindPeer, type RequestPeer } from "./peer.ts";
import { HANDSHAKE_DEADLINE_MS } from "./limits.ts";
import type { ReloadableListener, ServableApp, ServerTls } from "./types.ts";

/** Bytes one side of a relay may hold while the other cannot take them: past it, the connection is closed. */
const MAX_PENDING_BYTES = 1024 * 1024;
/** How long a request sent by a client that has gone may keep its loopback connection, waiting for the app. */
export const ANSWER_BOUND_MS = 60_000;

/** One TLS connection and its loopback twin. */
interface Relay {
  outer: Socket<Relay>;
  inner: Socket<Relay> | null;
  peer: RequestPeer | null;
  address: string;
  /** Bytes waiting for each side: before the loopback connection is up, or while a side is full. */
  toInner: Uint8Array[];
  toOuter: Uint8Array[];
  pendingBytes: number;
  /** Ends this connection's place among the handshakes of its address. */
  leaveHandshake: () => void;
  handshakeTimer: ReturnType<typeof setTimeout> | undefined;
  /** End the TLS connection once what is queued for it is written (the app closed its side). */
  endOuter: boolean;
  /** Bytes went to the app and no answer came back yet: a request may be in the app's hands. */
  awaitingAnswer: boolean;
  /** The client's side is gone: what the app answers goes nowhere. */
  outerGone: boolean;
  /**
   * Its identity's place under the connection cap is given back: when both sides are done, not when the client
   * leaves a request in the app's hands, or closing right after each request would hold unbounded work (issue 18
   * attacker, F3: 60 half-sent POSTs left 122 sockets while new connections were admitted).
   */
  placeReleased: boolean;
  /** Both sides are done with, or were cut off. */
  closed: boolean;
  /** Refused with a reason the client can act on: answered once with it (429, 403), never relayed. */
  refused: RefusalAnswer | null;
}

export interface GateOptions {
  port: number;
  hostname: string;
  tls: ServerTls;
  /** Share the port with sibling workers (SO_REUSEPORT without the exclusive check). */
  sharePort: boolean;
  admission: Admission;
  /** Serves one request as Bun.serve would (the app's fetch). */
  fetch: (request: Request) => Response | Promise<Response>;
  /** Bun.serve options of the app (body limit, idle timeout). */
  serve: object;
  /** Fails when anything holds the port; run before the first bind unless sharing. */
  probePortFree: () => Promise<void>;
  listenError: (error: unknown, port: number) => ConfigError;
}

function refusal(status: number, error: string, code: string): Response {
  return new Response(JSON.stringify({ error, code }), {
    status,
    headers: { "content-type": "application/json; charset=utf-8", connection: "close" },
  });
}

/** Writes `data` to `socket`, keeping what it cannot take yet in `queue` (written on drain). False: over the bound. */
function write(relay: Relay, socket: Socket<Relay>, queue: Uint8Array[], data: Uint8Array): boolean {
  if (queue.length === 0) {
    const written = socket.write(data);
    if (written === data.byteLength) return true;
    data = data.subarray(Math.max(written, 0));
  }
  // Kept past this callback: a copy, since the runtime may reuse the buffer it handed us.
  queue.push(Uint8Array.from(data));
  relay.pendingBytes += data.byteLength;
  return relay.pendingBytes <= MAX_PENDING_BYTES;
}

/** Writes what `queue` holds to `socket` as far as it takes it. */
function flush(relay: Relay, socket: Socket<Relay>, queue: Uint8Array[]): void {
  while (queue.length > 0) {
    const next = queue[0]!;
    const written = socket.write(next);
    if (written >= next.byteLength) {
      queue.shift();
      relay.pendingBytes -= next.byteLength;
      continue;
    }
    if (written > 0) {
      queue[0] = next.subarray(written);
      relay.pendingBytes -= written;
    }
    return;
  }
}

/**
 * Serves `fetch` over mutual TLS at `options.port` through the gate: TLS and the admission decision here, HTTP in a
 * loopback Bun.serve. reload() swaps the TLS material by binding a new TLS listener on the port (SO_REUSEPORT) and
 * stopping the old one's accepts; open connections keep going, and revocation is asked on every request.
 */
/** Where the relays' loopback connections come from; the inner server serves no other address. */
const RELAY_SOURCE_ADDRESS = "127.0.0.1";

export async function serveThroughGate(app: ServableApp, options: GateOptions): Promise<ReloadableListener> {
  const { admission } = options;
  /** Loopback connections by their source port: how a request in Bun.serve finds its TLS peer. */
  const byInnerPort = new Map<number, Relay>();
  /** Every open TLS connection, whichever listener (before or after a reload) accepted it. */
  const relays = new Set<Relay>();

  const inner: Server<unknown> = Bun.serve({
    idleTimeout: 30,
    ...options.serve,
    port: 0,
    hostname: "127.0.0.1",
    reusePort: false,
    fetch(request, server) {
      const source = server.requestIP(request);
      // The relays connect from 127.0.0.1, and while one is open nothing else can use its 4-tuple; from another
      // loopback address (127.0.0.2, …) any local user could borrow a relay's port, so the address counts too
      // (issue 18 attacker, F1: a KeyServer token was taken that way with no certificate at all).
      const relay = source && source.address === RELAY_SOURCE_ADDRESS ? byInnerPort.get(source.port) : undefined;
      // Anything else on this host that connects here directly came past no TLS at all.
      if (!relay?.peer) return refusal(421, "connect through the TLS port", "ERR_FORBIDDEN");
      // Per request, not per handshake: a certificate revoked while its keep-alive connection is open is refused on
      // its next request, /health and /metrics included (#11, issue 18 L1).
      if (admission.isRevoked(relay.peer.serial)) return refusal(403, "certificate revoked", "ERR_REVOKED");
      return app.fetch(bindPeer(request, relay.peer));
    },
  });
  app.server = inner;

  const releasePlace = (relay: Relay) => {
    if (relay.placeReleased) return;
    relay.placeReleased = true;
    if (relay.peer) admission.released(relay.peer);
  };

  /** The client's side is over: nothing more is read from it; its place is free unless a request is still served. */
  const leaveOuter = (relay: Relay, keepPlace = false) => {
    if (relay.outerGone) return;
    relay.outerGone = true;
    relays.delete(relay);
    clearTimeout(relay.handshakeTimer);
    relay.leaveHandshake();
    if (!keepPlace) releasePlace(relay);
  };

  /** Cuts both sides now: a refusal, a side over its bound, or the listener stopping. */
  const close = (relay: Relay) => {
    leaveOuter(relay);
    releasePlace(relay);
    if (relay.closed) return;
    relay.closed = true;
    relay.inner?.end();
    relay.outer.end();
  };

  /**
   * The client closed its side (FIN or reset). A request it sent in full still reaches the app, as Bun.serve itself
   * would serve it: a POST that reached a hung server is committed once the server runs again, and its
   * Idempotency-Key makes it a repeat, not a second record (harness/mesh.test.ts, "a hung server"). So while a
   * request may be in the app's hands, the loopback connection, whose source port names the peer, stays open until
   * the app answers (the answer goes nowhere) or the bound passes; ending it at once would let the app look up a
   * request after its peer was forgotten.
   */
  const clientClosed = (relay: Relay) => {
    const pending = !relay.closed && relay.peer !== null && (relay.awaitingAnswer || relay.toInner.length > 0);
    leaveOuter(relay, pending);
    if (relay.closed) return;
    if (!relay.peer || !pending) return close(relay);
    setTimeout(() => close(relay), ANSWER_BOUND_MS).unref?.();
  };

  const connectInner = async (relay: Relay) => {
    let socket: Socket<Relay>;
    try {
      socket = await Bun.connect<Relay>({
        hostname: "127.0.0.1",
        port: inner.port!,
        data: relay,
        socket: {
          data(s, chunk) {
            s.data.awaitingAnswer = false;
            if (s.data.outerGone) return close(s.data); // the app answered a client that is gone: nothing to pass on
            if (!write(s.data, s.data.outer, s.data.toOuter, chunk)) close(s.data);
            return undefined;
          },
          drain(s) {
            flush(s.data, s, s.data.toInner);
          },
          close(s) {
            const r = s.data;
            byInnerPort.delete(s.localPort);
            // The app closed (its idle timeout, Connection: close): end the TLS side once its bytes are out.
            if (r.outerGone || r.toOuter.length === 0) close(r);
            else r.endOuter = true;
          },
          error() {},
        },
      });
    } catch {
      return close(relay);
    }
    if (relay.closed) return void socket.end();
    relay.inner = socket;
    byInnerPort.set(socket.localPort, relay);
    if (relay.toInner.length > 0) relay.awaitingAnswer = true;
    flush(relay, socket, relay.toInner);
  };

  const listen = (tls: ServerTls): TCPSocketListener<Relay> => {
    try {
      return Bun.listen<Relay>({
        hostname: options.hostname,
        port: options.port === 0 && currentPort !== 0 ? currentPort : options.port,
        // Bun.listen takes it (measured on 1.4.5) though its types leave it out: a reload binds beside the old one.
        ...({ reusePort: true } as object),
        // rejectUnauthorized off: with it on, Bun resets a connection whose certificate is ours but not for client
        // authentication before the gate could tell the client why (issue 23). Nothing is admitted on that:
        // admission.admit() refuses every connection BoringSSL did not authorize (`authorized`, checked explicitly).
        tls: { cert: tls.cert, key: tls.key, ca: tls.ca, requestCert: admission.mutual, rejectUnauthorized: false } as object,
        socket: {
          open(outer) {
            const address = plainAddress(outer.remoteAddress);
            const relay: Relay = {
              outer,
              inner: null,
              peer: null,
              address,
              toInner: [],
              toOuter: [],
              pendingBytes: 0,
              leaveHandshake: () => {},
              handshakeTimer: undefined,
              endOuter: false,
              awaitingAnswer: false,
              outerGone: false,
              placeReleased: false,
              closed: false,
              refused: null,
            };
            outer.data = relay;
            relays.add(relay);
            relay.leaveHandshake = admission.handshakeStarted(address, () => close(relay));
            // The deadline starts at the TCP accept, so a connection that never starts a handshake is cut off too.
            relay.handshakeTimer = setTimeout(() => {
              admission.handshakeTimedOut(address);
              close(relay);
            }, HANDSHAKE_DEADLINE_MS);
          },
          handshake(outer, success) {
            const relay = outer.data;
            clearTimeout(relay.handshakeTimer);
            relay.leaveHandshake();
            const decision = success ? admission.admit(relay.address, outer.authorized, outer.getPeerCertificate()) : null;
            if (!decision || "refusal" in decision) {
              leaveOuter(relay);
              const answer = decision ? refusalAnswer(decision.refusal) : null;
              if (answer) {
                // A refusal the client can act on: its first request gets the reason (a 429, a 403), then a close.
                relay.refused = answer;
                relay.handshakeTimer = setTimeout(() => close(relay), CAP_ANSWER_WITHIN_MS);
                return;
              }
              relay.closed = true; // nothing admitted, nothing to release
              outer.terminate();
              return;
            }
            relay.peer = decision.peer;
            void connectInner(relay);
          },
          data(outer, chunk) {
            const relay = outer.data;
            if (relay.refused) {
              const answer = relay.refused;
              relay.refused = null;
              outer.end(rawRefusal(answer));
              return;
            }
            if (relay.inner === null) {
              // The loopback connection is still being made: keep the bytes, bounded, and send them once it is up.
              relay.toInner.push(Uint8Array.from(chunk));
              relay.pendingBytes += chunk.byteLength;
              if (relay.pendingBytes > MAX_PENDING_BYTES) close(relay);
              return;
            }
            relay.awaitingAnswer = true;
            if (!write(relay, relay.inner, relay.toInner, chunk)) close(relay);
          },
          drain(outer) {
            const relay = outer.data;
            flush(relay, outer, relay.toOuter);
            if (relay.endOuter && relay.toOuter.length === 0) close(relay);
          },
          close(outer) {
            if (outer.data) clientClosed(outer.data);
          },
          error() {},
        },
      });
    } catch (error) {
      throw options.listenError(error, options.port);
    }
  };

  let currentPort = 0;
  if (!options.sharePort)
    await options.probePortFree().catch((error) => {
      inner.stop(true);
      throw error;
    });
  let outer: TCPSocketListener<Relay>;
  try {
    outer = listen(options.tls);
  } catch (error) {
    inner.stop(true);
    throw error;
  }
  currentPort = outer.port;
  let stopped = false;
  return {
    port: currentPort,
    loopbackPort: inner.port,
    async reload(tls) {
      if (stopped) throw new ConfigError(`the listener on ${options.hostname}:${currentPort} is stopped`);
      const next = listen(tls); // throws before anything changed: the old TLS stays in service
      admission.trust(tls.ca);
      const previous = outer;
      outer = next;
      previous.stop(false); // no new connections there; its open ones go on
    },
    async stop(closeActiveConnections = false) {
      stopped = true;
      outer.stop(closeActiveConnections);
      if (closeActiveConnections) for (const relay of [...relays]) close(relay);
      await inner.stop(closeActiveConnections);
      if (app.server === inner) app.server = null;
    },
  };
}
