// The Deno side of the runtime seam. Each gap it closes was measured on Deno 2.9.6 (issue 12):
// - Elysia's listen is Bun.serve, and Deno.serve ignores client-certificate options (denoland/deno#26825): every
//   listener is node:https (which enforces requestCert and keeps connections alive) handing requests to app.handle.
// - node:https ignores the `crl` option: revocation is checked on every request (isRevoked, or tls.crl parsed
//   and verified with the CA).
// - Peer certificates carry no ext_key_usage: the EKU is read from the DER (shared/platform/eku.ts).
// - fetch ignores Bun's `tls` option: Deno.createHttpClient, one per TLS options object; and since no fetch can
//   check the peer's identity, a request with checkServerIdentity goes through node:https, which calls it.
// - fetch's errors are a bare TypeError("fetch failed"): network-errors.ts reads the reason out of its cause.
// - Host names: Deno's fetch (rustls) checks them against the SANs; node:https calls only the check it is given,
//   so that check runs after afterHostnameCheck (#14).
import { createHmac } from "node:crypto";
import https from "node:https";
import { isIP } from "node:net";
import { parseCrl, type RevocationList } from "../../authz/crl.ts";
import { withExtendedKeyUsage } from "../eku.ts";
import { ConfigError } from "../errors.ts";
import { listenNode } from "./node-listener.ts";
import { afterHostnameCheck } from "./hostname-check.ts";
import { normaliseFetchError } from "./network-errors.ts";
import type { AppListenOptions, ClientTls, ReloadableListener, Runtime, ServableApp, ServerTls, TlsRequestInit, TlsServerFactory } from "./types.ts";

/** The little of Deno's own API used here (tsconfig carries Bun's types only). */
interface DenoHttpClient {
  close(): void;
}
interface DenoApi {
  createHttpClient(options: { caCerts?: string[]; cert?: string; key?: string }): DenoHttpClient;
}
const deno = () => (globalThis as unknown as { Deno: DenoApi }).Deno;

/** One HTTP client (and so one connection pool) per TLS options object: the callers keep theirs until a reload. */
const clients = new WeakMap<ClientTls, DenoHttpClient>();

function clientFor(tls: ClientTls): DenoHttpClient {
  let client = clients.get(tls);
  if (!client) {
    if (!tls.rejectUnauthorized) throw new TypeError("rejectUnauthorized: false is not supported: securemesh always verifies its peers");
    client = deno().createHttpClient({ ...(tls.ca ? { caCerts: [tls.ca] } : {}), ...(tls.cert && tls.key ? { cert: tls.cert, key: tls.key } : {}) });
    clients.set(tls, client);
  }
  return client;
}

/**
 * A request over node:https, for a hop whose peer identity must be checked: it calls checkServerIdentity with the
 * peer certificate (EKU filled in) and sends nothing when it returns an Error. A connection of its own, as Bun's
 * fetch opens for a request with checkServerIdentity.
 */
async function fetchCheckingIdentity(url: URL, init: TlsRequestInit, tls: ClientTls): Promise<Response> {
  const check = afterHostnameCheck(tls.checkServerIdentity!);
  const body = init.body == null ? undefined : Buffer.from(await new Response(init.body).arrayBuffer());
  const headers: Record<string, string> = {};
  new Headers(init.headers).forEach((value, name) => {
    headers[name] = value;
  });
  if (body) headers["content-length"] = String(body.length);
  const hostname = url.hostname.replace(/^\[|\]$/g, "");
  const signal = init.signal ?? undefined;
  signal?.throwIfAborted();
  return new Promise<Response>((resolve, reject) => {
    let refusal: Error | undefined;
    const request = https.request({
      host: hostname,
      port: url.port || 443,
      path: url.pathname + url.search,
      method: init.method ?? "GET",
      headers,
      ...(tls.cert && tls.key ? { cert: tls.cert, key: tls.key } : {}),
      ...(tls.ca ? { ca: tls.ca } : {}),
      ...(isIP(hostname) ? {} : { servername: hostname }),
      rejectUnauthorized: tls.rejectUnauthorized,
      agent: false,
      checkServerIdentity: (host, cert) => (refusal = check(host, withExtendedKeyUsage(cert))),
    }, (response) => {
      const chunks: Buffer[] = [];
      response.on("data", (chunk: Buffer) => chunks.push(chunk));
      response.on("error", (error) => reject(error));
      response.on("end", () => {
        const status = response.statusCode ?? 502;
        const answer = new Headers();
        for (let i = 0; i + 1 < response.rawHeaders.length; i += 2) answer.append(response.rawHeaders[i]!, response.rawHeaders[i + 1]!);
        const empty = status === 204 || status === 205 || status === 304 || (init.method ?? "GET") === "HEAD";
        resolve(new Response(empty ? null : Buffer.concat(chunks), { status, statusText: response.statusMessage, headers: answer }));
      });
    });
    const onAbort = () => {
      request.destroy();
      reject(signal!.reason);
    };
    signal?.addEventListener("abort", onAbort, { once: true });
    request.on("close", () => signal?.removeEventListener("abort", onAbort));
    request.on("error", (error) => reject(refusal ?? error));
    request.end(body);
  });
}

/**
 * Every Elysia app listens through node:https (mutual TLS when asked), or node:http without TLS. Revocation is
 * checked on every request: with the role's live CRL when it passes `isRevoked`, else with `tls.crl`, verified
 * against the CA and re-read on every reload.
 */
async function serveApp(app: ServableApp, options: AppListenOptions): Promise<ReloadableListener> {
  // A backstop: roles ask runtime.sharesPorts first.
  if (options.sharePort) throw new ConfigError("sharing a port with other workers needs Bun");
  const revocations = (tls: ServerTls | undefined): RevocationList | null => (tls?.crl && tls.ca ? parseCrl(tls.crl, tls.ca) : null);
  let crl = revocations(options.tls);
  const listener = await listenNode(app, {
    port: options.port,
    hostname: options.hostname,
    tls: options.tls,
    createTlsServer,
    requireClientCertificate: options.tls?.requestCert === true,
    // The app answers 413 itself (JSON, in the access log); this is the backstop, as Bun.serve's maxRequestBodySize.
    bodyLimit: options.bodyLimit * 4,
    // Bun.serve has no per-identity cap; neither has this (the coordinator is one identity with many connections).
    maxConnectionsPerIdentity: Number.POSITIVE_INFINITY,
    isRevoked: options.isRevoked ?? ((serial) => crl?.isRevoked(serial) ?? false),
  });
  return {
    port: listener.port,
    async reload(tls) {
      const next = revocations(tls); // a CRL the CA did not sign throws here, and the old material stays
      await listener.reload(tls);
      crl = next;
    },
    stop: () => listener.close(),
  };
}

/** node:https: it enforces requestCert, exposes the peer certificate, and keeps connections alive on Deno. */
const createTlsServer: TlsServerFactory = (options, onSecure, onRequest) => {
  const server = https.createServer({ ...options, maxHeaderSize: 16 * 1024 }, onRequest);
  server.on("secureConnection", (socket) => void onSecure(socket));
  return { server, closeAllConnections: () => server.closeAllConnections?.() };
};

export const denoRuntime: Runtime = {
  name: "deno",
  sharesPorts: false,
  // createHmac: 18–24 µs per 1 KiB on Deno; there is nothing faster there.
  hmacSha256: (key, data) => createHmac("sha256", key).update(data).digest(),
  async fetch(input: string | URL, init: TlsRequestInit = {}) {
    const { tls, ...rest } = init;
    try {
      if (!tls) return await fetch(input, rest);
      if (tls.checkServerIdentity) return await fetchCheckingIdentity(new URL(input), rest, tls);
      return await fetch(input, { ...rest, client: clientFor(tls) } as RequestInit);
    } catch (error) {
      throw normaliseFetchError(error);
    }
  },
  serveApp,
  createTlsServer,
};
