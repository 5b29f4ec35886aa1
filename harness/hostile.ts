// Hostile inputs, counted: each case runs N attempts and records every outcome that was not the expected one
// (a refusal for most cases; an allow, a 403 or a measured bound for the regression cases of #11).
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import net from "node:net";
import tls from "node:tls";
import { readPkiFile } from "../shared/platform/config.ts";
import { loadIdentity } from "../shared/platform/tls.ts";
import { renderTable, runPkiSh, waitFor } from "./fixtures/index.ts";

export interface CaseResult {
  role: string;
  name: string;
  attempts: number;
  /** Attempts whose outcome was the expected one (for most cases: refused). */
  asExpected: number;
  unexpected: string[];
}

/** Runs cases and keeps their counts; `attempt` returns null for the expected outcome, or what happened instead. */
export class Tally {
  readonly results: CaseResult[] = [];
  /** Measured figures worth a line in the summary (how long until a slow connection was closed, …). */
  readonly notes: string[] = [];
  /** `progress` gets a line per finished case; `status`, if given, a running count after every attempt. */
  constructor(
    private readonly progress: (line: string) => void = () => {},
    private readonly status?: (text: () => string) => void,
  ) {}

  async run(role: string, name: string, attempts: number, attempt: (i: number) => Promise<string | null>, parallel = 1): Promise<CaseResult> {
    const result: CaseResult = { role, name, attempts, asExpected: 0, unexpected: [] };
    let next = 0;
    await Promise.all(
      Array.from({ length: parallel }, async () => {
        while (next < attempts) {
          const i = next++;
          let outcome: string | null;
          try {
            outcome = await attempt(i);
          } catch (error) {
            outcome = `threw: ${(error as Error).message}`;
          }
          if (outcome === null) result.asExpected += 1;
          else if (result.unexpected.length < 5) result.unexpected.push(outcome); // a few examples are enough to act on
          this.status?.(() => `${role} ${name}: ${i + 1}/${attempts}, ${this.results.length} cases done`);
        }
      }),
    );
    this.results.push(result);
    this.progress(`${result.asExpected === attempts ? "ok  " : "FAIL"} ${role.padEnd(12)} ${name} ${result.asExpected}/${attempts}`);
    return result;
  }

  get failures(): CaseResult[] {
    return this.results.filter((r) => r.asExpected !== r.attempts);
  }

  /** The table the scenario prints: case, attempts, how many came out as expected, the first unexpected outcome. */
  table(): string {
    const rows = this.results.map((r) => [r.role, r.name, String(r.attempts), String(r.asExpected), r.unexpected.length ? r.unexpected[0]! : "0"]);
    const header = ["role", "case", "attempts", "as expected", "unexpected"];
    return renderTable(header, rows).join("\n");
  }
}

export interface TlsMaterial {
  cert?: string;
  key?: string;
  ca: string;
}

async function sh(args: string[], env: Record<string, string> = {}): Promise<void> {
  await using proc = Bun.spawn(args, { env: { ...process.env, ...env }, stdout: "pipe", stderr: "pipe" });
  const [stderr, code] = await Promise.all([new Response(proc.stderr).text(), proc.exited]);
  if (code !== 0) throw new Error(`${args.join(" ")} failed: ${stderr.trim()}`);
}

/**
 * Client certificates no role may accept, issued by pki.sh into the roles' own PKI (so the revoked one is on its
 * CRL) before the roles start, plus a client of another CA and a self-signed one.
 */
export async function hostileCertificates(pki: string, otherPki: string): Promise<Record<string, TlsMaterial>> {
  await runPkiSh(pki, "issue", "expired-client", "--client", "--not-before", "20200101000000Z", "--not-after", "20200201000000Z");
  await runPkiSh(pki, "issue", "future-client", "--client", "--not-before", "20400101000000Z", "--not-after", "20410101000000Z");
  await runPkiSh(pki, "issue", "revoked-client", "--client");
  await runPkiSh(pki, "revoke", "revoked-client");
  const selfDir = join(pki, "self-signed");
  mkdirSync(selfDir, { recursive: true });
  await sh([
    "openssl",
    "req",
    "-x509",
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:P-256",
    "-nodes",
    "-days",
    "30",
    "-subj",
    "/O=securemesh/CN=client1",
    "-addext",
    "extendedKeyUsage=clientAuth",
    "-keyout",
    join(selfDir, "client1_key.pem"),
    "-out",
    join(selfDir, "client1_cert.pem"),
  ]);
  const ca = readPkiFile(pki, "ca_cert.pem");
  const pair = (dir: string, name: string) => ({ cert: readPkiFile(dir, `${name}_cert.pem`), key: readPkiFile(dir, `${name}_key.pem`), ca });
  return {
    "no certificate": { ca },
    "another CA": pair(otherPki, "client1"),
    expired: pair(pki, "expired-client"),
    "not yet valid": pair(pki, "future-client"),
    "self-signed": pair(selfDir, "client1"),
    "server cert as client (EKU)": pair(pki, "server"),
    revoked: pair(pki, "revoked-client"),
  };
}

/** Whether an answer is a listener's refusal of the connection itself (ERR_REVOKED, ERR_CLIENT_CERT), not the app's. */
export function connectionRefusal(status: number, body: string): boolean {
  if (status !== 403) return false;
  try {
    const code = (JSON.parse(body) as { code?: unknown }).code;
    return code === "ERR_REVOKED" || code === "ERR_CLIENT_CERT";
  } catch {
    return false;
  }
}

/** null when the handshake (or the connection) was refused, or the listener said so; otherwise what the role answered. */
export async function tlsRefused(url: string, material: TlsMaterial): Promise<string | null> {
  try {
    const response = await fetch(`${url}/health`, { tls: material, signal: AbortSignal.timeout(5000), keepalive: false });
    const text = await response.text();
    // Refused by the listener at admission, and told why (a revoked certificate, one not for clients): issue 23.
    return connectionRefusal(response.status, text) ? null : `accepted: ${response.status}`;
  } catch (error) {
    return (error as { name?: string }).name === "TimeoutError" ? "timeout instead of a refusal" : null;
  }
}

/**
 * Opens a TLS connection with a valid certificate, sends half a request line and headers, then nothing:
 * null when the role closes it within `limitMs`.
 */
export function slowHeadersClosed(url: string, material: TlsMaterial, limitMs: number): Promise<string | null> {
  const { hostname, port } = new URL(url);
  return new Promise((resolve) => {
    const started = Date.now();
    const socket = tls.connect({ host: hostname, port: Number(port), cert: material.cert, key: material.key, ca: material.ca }, () => {
      socket.write("POST /api/data HTTP/1.1\r\nHost: localhost\r\nX-Slow: ");
    });
    const timer = setTimeout(() => {
      socket.destroy();
      resolve(`still open after ${limitMs} ms`);
    }, limitMs);
    socket.on("error", () => {});
    socket.on("close", () => {
      clearTimeout(timer);
      resolve(Date.now() - started <= limitMs ? null : "closed too late");
    });
  });
}

/** Sends `request` as raw bytes over a mutual-TLS connection and resolves with everything the role answers. */
export function rawHttp(url: string, material: TlsMaterial, request: string, limitMs = 10_000): Promise<string> {
  const { hostname, port } = new URL(url);
  return new Promise((resolve) => {
    let answer = "";
    const socket = tls.connect({ host: hostname, port: Number(port), cert: material.cert, key: material.key, ca: material.ca }, () => socket.write(request));
    const timer = setTimeout(() => socket.destroy(), limitMs);
    socket.on("data", (chunk) => (answer += chunk.toString("latin1")));
    socket.on("error", () => {});
    socket.on("close", () => {
      clearTimeout(timer);
      resolve(answer);
    });
  });
}

/** null for a 4xx with a JSON {"error": …} body; otherwise a description. */
export async function clear4xx(response: Response, expected?: number): Promise<string | null> {
  const text = await response.text();
  if (expected !== undefined && response.status !== expected) return `status ${response.status} (wanted ${expected}): ${text.slice(0, 80)}`;
  if (response.status < 400 || response.status >= 500) return `status ${response.status}: ${text.slice(0, 80)}`;
  try {
    const body = JSON.parse(text) as { error?: unknown };
    return typeof body.error === "string" ? null : `no error field: ${text.slice(0, 80)}`;
  } catch {
    return `status ${response.status} without JSON: ${text.slice(0, 80)}`;
  }
}

/** A mutual-TLS connection to `url` with `material`, once the handshake is done (rejects if it is refused). */
export function connectTls(url: string, material: TlsMaterial): Promise<tls.TLSSocket> {
  const { hostname, port } = new URL(url);
  return new Promise((resolve, reject) => {
    const socket = tls.connect({ host: hostname, port: Number(port), cert: material.cert, key: material.key, ca: material.ca }, () => resolve(socket));
    socket.once("error", reject);
  });
}

/** Resolves with the time (performance.now()) at which `socket` closed, or null if it is still open after `limitMs`. */
export function closedWithin(socket: net.Socket, limitMs: number): Promise<number | null> {
  if (socket.destroyed) return Promise.resolve(performance.now());
  return new Promise((resolve) => {
    const timer = setTimeout(() => resolve(null), limitMs);
    socket.once("close", () => {
      clearTimeout(timer);
      resolve(performance.now());
    });
  });
}

/**
 * Opens a connection, sends the start of a request, then one more header byte every `everyMs`: how long until the
 * role closes it (ms), or null when it is still open after `limitMs` (#11 M2: a deadline from accept, not an idle timer).
 */
export async function dribbleClosedAfter(url: string, material: TlsMaterial, everyMs: number, limitMs: number): Promise<number | null> {
  const started = performance.now();
  const socket = await connectTls(url, material);
  socket.on("error", () => {});
  socket.write("GET /health HTTP/1.1\r\nHost: localhost\r\nX-Slow: ");
  const dribble = setInterval(() => {
    if (socket.writable) socket.write("a");
  }, everyMs);
  try {
    const closedAt = await closedWithin(socket, limitMs);
    return closedAt === null ? null : closedAt - started;
  } finally {
    clearInterval(dribble);
    socket.destroy();
  }
}

export interface RawAnswer {
  status: number;
  headers: Record<string, string>;
  body: string;
}

/** Parses one HTTP/1.1 answer as bytes read off the socket (Content-Length or chunked); null when there is none. */
export function parseHttpAnswer(raw: string): RawAnswer | null {
  const end = raw.indexOf("\r\n\r\n");
  if (end < 0) return null;
  const [statusLine, ...headerLines] = raw.slice(0, end).split("\r\n");
  const status = Number(/^HTTP\/1\.[01] (\d{3})/.exec(statusLine ?? "")?.[1]);
  if (!status) return null;
  const headers: Record<string, string> = {};
  for (const line of headerLines) {
    const colon = line.indexOf(":");
    if (colon > 0) headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
  }
  let body = raw.slice(end + 4);
  if (/chunked/i.test(headers["transfer-encoding"] ?? "")) {
    let decoded = "";
    for (let rest = body; ; ) {
      const lineEnd = rest.indexOf("\r\n");
      const size = parseInt(rest.slice(0, lineEnd), 16);
      if (lineEnd < 0 || !Number.isFinite(size) || size === 0) break;
      decoded += rest.slice(lineEnd + 2, lineEnd + 2 + size);
      rest = rest.slice(lineEnd + 2 + size + 2);
    }
    body = decoded;
  } else if (headers["content-length"] !== undefined) {
    body = body.slice(0, Number(headers["content-length"]));
  }
  return { status, headers, body };
}

/**
 * Sends `head` and then `body` in chunked transfer encoding (no Content-Length: the role must count the bytes it
 * reads), `chunkSize` bytes a chunk; resolves with everything the role answered before it closed or `limitMs`.
 */
export async function sendChunked(url: string, material: TlsMaterial, head: string, body: Uint8Array, chunkSize = 8192, limitMs = 10_000): Promise<string> {
  const socket = await connectTls(url, material);
  let answer = "";
  socket.on("data", (chunk: Buffer) => (answer += chunk.toString("latin1")));
  socket.on("error", () => {});
  const closed = closedWithin(socket, limitMs);
  socket.write(`${head.replace(/\r\n$/, "")}\r\nTransfer-Encoding: chunked\r\n\r\n`);
  for (let at = 0; at < body.length && socket.writable; at += chunkSize) {
    const chunk = body.subarray(at, at + chunkSize);
    socket.write(`${chunk.length.toString(16)}\r\n`);
    socket.write(chunk);
    if (!socket.write("\r\n")) await new Promise((r) => socket.once("drain", r).once("close", r));
  }
  if (socket.writable) socket.write("0\r\n\r\n");
  // The answer is complete when its declared length has arrived; the role may keep the connection open.
  let over = false;
  void closed.then(() => (over = true));
  while (!over && !socket.destroyed) {
    const parsed = parseHttpAnswer(answer);
    if (parsed && (parsed.headers["content-length"] === undefined || parsed.body.length >= Number(parsed.headers["content-length"]))) break;
    await Promise.race([closed, new Promise((r) => socket.once("data", r))]);
  }
  socket.destroy();
  return answer;
}

/** Plain HTTP to a loopback listener with a chosen Host header (the admin listener's DNS-rebinding check). */
export function plainHttp(url: string, request: string, limitMs = 5000): Promise<string> {
  const { hostname, port } = new URL(url);
  return new Promise((resolve) => {
    let answer = "";
    const socket = net.connect(Number(port), hostname, () => socket.write(request));
    const timer = setTimeout(() => socket.destroy(), limitMs);
    socket.on("data", (chunk) => {
      answer += chunk.toString("latin1");
      const parsed = parseHttpAnswer(answer);
      if (parsed && parsed.headers["content-length"] !== undefined && parsed.body.length >= Number(parsed.headers["content-length"])) socket.destroy();
    });
    socket.on("error", () => {});
    socket.on("close", () => {
      clearTimeout(timer);
      resolve(answer);
    });
  });
}

/** A TLS server under another valid certificate of our CA, recording every byte a client sends past the handshake. */
export interface Impostor extends AsyncDisposable {
  port: number;
  handshakes: number;
  bytes: number;
}

/**
 * Binds `port` (a dead server's) with `name`'s certificate (another identity of our CA, naming the same host) and
 * answers anything it is sent as a server would acknowledge a write, so an acknowledgement that came from it shows.
 */
export async function startImpostor(pki: string, name: string, port: number): Promise<Impostor> {
  const identity = loadIdentity(pki, name);
  const impostor = { port, handshakes: 0, bytes: 0 };
  const fake = JSON.stringify({ result: "ok", id: IMPOSTOR_ID, server: port });
  const server = tls.createServer({ cert: identity.cert, key: identity.key, ca: identity.ca, requestCert: true, rejectUnauthorized: false }, (socket) => {
    impostor.handshakes += 1;
    socket.on("error", () => {});
    socket.on("data", (chunk: Buffer) => {
      impostor.bytes += chunk.length;
      socket.write(`HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: ${fake.length}\r\n\r\n${fake}`);
    });
  });
  server.on("tlsClientError", () => {});
  // The port was the server's a moment ago: bind as soon as the kernel lets go of it.
  await waitFor(
    `port ${port} to be free for the impostor`,
    () =>
      new Promise<boolean>((resolve) => {
        server.once("error", () => resolve(false));
        server.listen(port, "127.0.0.1", () => resolve(true));
      }),
    5000,
  );
  return Object.assign(impostor, { [Symbol.asyncDispose]: () => new Promise<void>((resolve) => server.close(() => resolve())) });
}

/** The record id the impostor claims for every write: an acknowledgement carrying it came from the impostor. */
export const IMPOSTOR_ID = 424_242;
