// The coordinator's app in process (as hono and elysia test routes, through app.handle): per-identity limits on
// the TLS caller before anything is forwarded, and a server's own 429 passed on with its Retry-After (issue 20).
import { describe, expect, test } from "bun:test";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Authorizer, RequestLimiter } from "../authz/index.ts";
import type { HttpsRequest } from "../platform/https-client.ts";
import { createLogger } from "../ops/log.ts";
import { handledAs } from "../testing/peers.ts";
import { UpstreamPool, type UpstreamAnswer, type UpstreamTransport } from "../request-path/upstream.ts";
import { createCoordinatorApp } from "./app.ts";
import { waitFor } from "../../harness/cluster.ts";

const SERVER = "https://server.test:5001";
const CLIENT1 = "spiffe://securemesh/client/client1";
const CLIENT2 = "spiffe://securemesh/client/client2";

/** A server that answers each forward with what `answer` says, after `gate` opens; it counts what reached it. */
class HeldTransport implements UpstreamTransport {
  forwards = 0;
  gate = Promise.resolve();
  constructor(readonly answer: () => { status: number; headers?: Record<string, string> } = () => ({ status: 200 })) {}
  async request(_url: string, init: HttpsRequest): Promise<UpstreamAnswer> {
    if (init.method !== "GET" || !String(_url).endsWith("/health")) this.forwards += 1;
    await this.gate;
    const { status, headers = {} } = this.answer();
    const body = new TextEncoder().encode(JSON.stringify(status === 200 ? { result: "ok" } : { error: "over", code: "ERR_RATE_LIMITED" }));
    return { status, body, header: (name) => (name === "content-type" ? "application/json" : (headers[name] ?? null)) };
  }
}

function coordinator(
  transport: HeldTransport,
  options: { limits?: unknown[]; rules?: unknown[]; servers?: string[]; logs?: string[]; drainable?: boolean } = {},
) {
  const logger = createLogger("coordinator", { format: "text", color: false, write: (line) => options.logs?.push(line) });
  const dir = mkdtempSync(join(tmpdir(), "securemesh-coordinator-app-"));
  writeFileSync(join(dir, "policy.json"), JSON.stringify({ rules: options.rules ?? [], limits: options.limits ?? [] }));
  const authz = new Authorizer(join(dir, "policy.json"), logger);
  const pool = new UpstreamPool({ servers: options.servers ?? [SERVER], transport, logger });
  const app = createCoordinatorApp({
    pool,
    logger,
    authz,
    drainable: options.drainable,
    limiter: new RequestLimiter({ limits: (id) => authz.limits(id), logger }),
  });
  return (identity: string) => handledAs(app, identity);
}

const write = () =>
  new Request("http://localhost/api/data", {
    method: "POST",
    headers: { "content-type": "application/json", "idempotency-key": crypto.randomUUID() },
    body: "{}",
  });

describe("per-identity limits at the coordinator (issue 20)", () => {
  test("an identity over its requests in flight gets 429 with Retry-After, and nothing is forwarded; another is served", async () => {
    const transport = new HeldTransport();
    const as = coordinator(transport, { limits: [{ identity: CLIENT2, inFlight: 2 }] });
    const open = Promise.withResolvers<void>();
    transport.gate = open.promise;
    const held = [as(CLIENT2).handle(write()), as(CLIENT2).handle(write())];
    const over = await as(CLIENT2).handle(write());
    expect([over.status, over.headers.get("retry-after"), await over.json()]).toEqual([
      429,
      "1",
      { error: `${CLIENT2} already has 2 requests in flight, its limit`, code: "ERR_IN_FLIGHT_LIMIT" },
    ]);
    expect(transport.forwards).toBe(2);
    const other = as(CLIENT1).handle(write());
    open.resolve();
    expect((await Promise.all([...held, other])).map((r) => r.status)).toEqual([200, 200, 200]);
    expect((await as(CLIENT2).handle(write())).status).toBe(200);
  });

  test("a server's 429 reaches the client with the server's Retry-After", async () => {
    const as = coordinator(new HeldTransport(() => ({ status: 429, headers: { "retry-after": "3" } })));
    const answer = await as(CLIENT1).handle(write());
    expect([answer.status, answer.headers.get("retry-after"), answer.headers.get("x-securemesh-upstream")]).toEqual([429, "3", SERVER]);
  });
});

describe("draining one server on an operator's request (issue 20, admin.drain)", () => {
  const OPERATOR = "spiffe://securemesh/client/operator";
  const SERVER2 = "https://server2.test:5001";
  const adminPost = (path: string, server: string) =>
    new Request(`http://localhost${path}`, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ server }) });

  test("only an identity the policy allows admin.drain may drain; a client is refused 403 and audited", async () => {
    const logs: string[] = [];
    const as = coordinator(new HeldTransport(), { rules: [{ identity: OPERATOR, allow: ["admin.drain"] }], logs });
    const refused = await as(CLIENT1).handle(adminPost("/admin/drain", SERVER));
    expect([refused.status, await refused.json()]).toEqual([403, { error: `${CLIENT1} lacks permission admin.drain`, code: "ERR_FORBIDDEN" }]);
    expect(logs).toContain(`AUTHZ deny identity=${CLIENT1} action=admin.drain resource=- (no rule allows it)`);
    expect((await as(OPERATOR).handle(adminPost("/admin/drain", "https://nowhere.test:1"))).status).toBe(404);
  });

  test("a drained server gets no new request; the answer comes once its last one finished; undrain brings it back", async () => {
    const transport = new HeldTransport();
    const logs: string[] = [];
    const as = coordinator(transport, { rules: [{ identity: OPERATOR, allow: ["admin.drain"] }], servers: [SERVER, SERVER2], logs });
    const open = Promise.withResolvers<void>();
    transport.gate = open.promise;
    const inFlight = [as(CLIENT1).handle(write()), as(CLIENT1).handle(write())]; // one to each server
    // Its answer waits for the request to SERVER still in flight (a drain that did not wait says empty: false).
    const drain = as(OPERATOR).handle(adminPost("/admin/drain", SERVER));
    await waitFor("the drain's log line", () => logs.some((l) => l.includes("draining on request")), 5000);
    transport.gate = Promise.resolve();
    const during = await Promise.all(Array.from({ length: 4 }, () => as(CLIENT1).handle(write())));
    expect(during.map((r) => r.headers.get("x-securemesh-upstream"))).toEqual([SERVER2, SERVER2, SERVER2, SERVER2]);
    open.resolve();
    await Promise.all(inFlight);
    expect(await (await drain).json()).toEqual({ server: SERVER, draining: true, empty: true, inFlight: 0 });
    expect(logs.filter((l) => l.startsWith(`Server ${SERVER}`))).toEqual([
      `Server ${SERVER} draining on request of ${OPERATOR}: no new requests; 1 in flight`,
      `Server ${SERVER} drained: no request in flight`,
    ]);
    expect(await (await as(OPERATOR).handle(adminPost("/admin/undrain", SERVER))).json()).toEqual({ server: SERVER, draining: false, up: true });
    const after = await Promise.all(Array.from({ length: 2 }, () => as(CLIENT1).handle(write())));
    expect(after.map((r) => r.headers.get("x-securemesh-upstream")).sort()).toEqual([SERVER, SERVER2]);
  });

  test("a coordinator of --workers N refuses a drain that would reach one worker (409)", async () => {
    const as = coordinator(new HeldTransport(), { rules: [{ identity: OPERATOR, allow: ["admin.drain"] }], drainable: false });
    const answer = await as(OPERATOR).handle(adminPost("/admin/drain", SERVER));
    expect([answer.status, ((await answer.json()) as { code: string }).code]).toEqual([409, "ERR_CONFLICT"]);
  });
});
