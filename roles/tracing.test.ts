// Following one request across real processes by its id (#14): the client starts a W3C trace, and every hop's
// access line names it: client → coordinator → server → its store line, and → SecureProxy → KeyServer →
// marketplace. A request without a traceparent is followed by its X-Request-Id; a malformed one is replaced.
// Roles alternate between Deno and Bun (mixed), so each hop's forwarding runs on both.
import { afterAll, beforeAll, expect, setDefaultTimeout, test } from "bun:test";
import { startMesh, startTokenStack, type Mesh, type TokenStack } from "../harness/fixtures/index.ts";
import { loadIdentity, mutualTlsClientOptions } from "../shared/platform/tls.ts";
import { startTrace } from "../shared/ops/trace.ts";

setDefaultTimeout(120_000);

let mesh: Mesh;
let tokens: TokenStack;

beforeAll(async () => {
  mesh = await startMesh({ runtime: "mixed" });
  tokens = await startTokenStack({ cluster: mesh.cluster });
});

afterAll(async () => {
  await tokens?.[Symbol.asyncDispose]();
  await mesh?.[Symbol.asyncDispose]();
});

const escaped = (text: string) => text.replace(/[.*+?^${}()|[\]\\]/g, "\\$&");
/** The line a role logged (or logs within the timeout) that matches `pattern`. */
const logged = (role: string, pattern: RegExp) => mesh.cluster.role(role).waitForLine(pattern, 10_000);
const access = (method: string, path: string, status: number, id: string) => new RegExp(`"${method} ${escaped(path)} HTTP/1\\.1" ${status} - ${escaped(id)}$`);
/** Every line of every role so far, for what must appear nowhere. */
const allLines = () => [...mesh.cluster.roles.values()].flatMap((r) => r.lines);

test("one write followed by its trace id: client role → coordinator → server → the server's store line", async () => {
  const run = await mesh.cluster.runClient("client-traced", ["--coordinator", mesh.coordinator, "--no-cache-check", "--message", "follow me"]);
  expect(run.exitCode).toBe(0);
  const success = run.lines.find((l) => l.startsWith("[client1] Success: "))!;
  const { id, server, trace } = JSON.parse(success.slice(success.indexOf("{"))) as { id: number; server: number; trace: string };
  expect(trace).toMatch(/^[0-9a-f]{32}$/);
  const serverRole = mesh.servers.find((s) => s.port === server)!.name;
  expect(await logged("coordinator", access("POST", "/api/data", 200, `trace=${trace}`))).toBeTruthy();
  expect(await logged(serverRole, access("POST", "/api/data", 200, `trace=${trace}`))).toBeTruthy();
  expect(await logged(serverRole, new RegExp(`^Store: record ${id} stored for client1 in [\\d.]+ ms trace=${trace}$`))).toBeTruthy();
  // The one request, and nothing else, carries that id: one line per hop.
  expect(allLines().filter((l) => l.includes(trace)).length).toBe(3);
});

test("a broadcast carries the trace to every server", async () => {
  const report = await mesh.client().invalidateCache();
  expect(report.status).toBe(200);
  for (const role of ["coordinator", ...mesh.servers.map((s) => s.name)]) {
    expect({ role, line: Boolean(await logged(role, access("POST", "/api/invalidate_cache", 200, `trace=${report.trace}`))) }).toEqual({ role, line: true });
  }
});

test("client → SecureProxy → KeyServer → marketplace: each access line names the caller's trace", async () => {
  const trace = startTrace();
  const response = await fetch(`${tokens.secureproxy}/request_api`, {
    method: "POST",
    headers: { "content-type": "application/json", ...trace.outbound },
    body: JSON.stringify({ ClientId: "client1", TokenType: "marketplace", ApiUri: tokens.itemUri }),
    tls: mutualTlsClientOptions(loadIdentity(mesh.cluster.pki, "client1")),
    signal: AbortSignal.timeout(15_000),
  });
  expect(response.status).toBe(200);
  const id = `trace=${trace.id}`;
  expect(await logged("secureproxy", access("POST", "/request_api", 200, id))).toBeTruthy();
  expect(await logged("secureproxy", new RegExp(`^API call by .* answered 200 ${id}$`))).toBeTruthy();
  expect(await logged("keyserver", access("POST", "/", 200, id))).toBeTruthy();
  expect(await logged("marketplace", access("GET", "/api/item", 200, id))).toBeTruthy();
});

test("without a traceparent, a request is followed by its X-Request-Id; a malformed traceparent is replaced, never logged", async () => {
  const client = mesh.client();
  const read = (headers: Record<string, string>) =>
    fetch(`${mesh.coordinator}/api/get_cached_data`, {
      headers,
      tls: mutualTlsClientOptions(loadIdentity(mesh.cluster.pki, "client1")),
      signal: AbortSignal.timeout(10_000),
    });
  const proof = await client.readProof("/api/get_cached_data");
  expect((await read({ ...proof, "x-request-id": "follow-req-7" })).status).toBe(200);
  expect(await logged("coordinator", access("GET", "/api/get_cached_data", 200, "request_id=follow-req-7"))).toBeTruthy();
  const served = await Promise.any(mesh.servers.map((s) => logged(s.name, access("GET", "/api/get_cached_data", 200, "request_id=follow-req-7"))));
  expect(served).toBeTruthy();

  const forged = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-FORGED";
  expect((await read({ ...proof, traceparent: forged })).status).toBe(200);
  const coordinatorLine = await logged("coordinator", /"GET \/api\/get_cached_data HTTP\/1\.1" 200 - trace=(?!4bf92f3577b34da6a3ce929d0e0e4736)[0-9a-f]{32}$/);
  const replacement = /trace=([0-9a-f]{32})$/.exec(coordinatorLine)![1]!;
  expect(await Promise.any(mesh.servers.map((s) => logged(s.name, access("GET", "/api/get_cached_data", 200, `trace=${replacement}`))))).toBeTruthy();
  expect(allLines().filter((l) => l.includes("FORGED") || l.includes("4bf92f3577b34da6a3ce929d0e0e4736"))).toEqual([]);
});
