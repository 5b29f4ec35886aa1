// MeshClient's failover between coordinators, against stand-in coordinators over real mutual TLS: which one answered
// and after how many tries, so a report can count the requests that needed another attempt.
import { afterEach, beforeAll, describe, expect, test } from "bun:test";
import { loadFernetKeys } from "../platform/config.ts";
import { loadIdentity, mutualTlsServerOptions } from "../platform/tls.ts";
import { testPki } from "../testing/pki.ts";
import { Fernet } from "./fernet.ts";
import { MeshClient } from "./mesh-client.ts";

let pki: string;
beforeAll(async () => {
  pki = await testPki("main");
});

const servers: Bun.Server<unknown>[] = [];
afterEach(() => {
  for (const server of servers.splice(0)) server.stop(true);
});

/** A stand-in coordinator on a free port that answers every request with `status` and a JSON body. */
function standIn(status: number): string {
  const server = Bun.serve({
    port: 0,
    hostname: "127.0.0.1",
    tls: mutualTlsServerOptions(loadIdentity(pki, "coordinator")),
    fetch: () => Response.json(status === 200 ? { result: "ok", id: 7 } : { error: "no server is up" }, { status }),
  });
  servers.push(server);
  return `https://127.0.0.1:${server.port}`;
}

/** A URL where nothing listens: a port that was free a moment ago. */
function nothingListening(): string {
  const server = Bun.serve({ port: 0, hostname: "127.0.0.1", fetch: () => new Response() });
  const url = `https://127.0.0.1:${server.port}`;
  server.stop(true);
  return url;
}

const client = (coordinators: string[]) =>
  new MeshClient({ identity: loadIdentity(pki, "client1"), fernet: new Fernet(loadFernetKeys(pki)), coordinators, backoffMs: 1 });

describe("MeshClient failover", () => {
  test("the first coordinator answers: one attempt", async () => {
    const ok = standIn(200);
    const { status, coordinator, attempts } = await client([ok, standIn(200)]).sendData("hello");
    expect({ status, coordinator, attempts }).toEqual({ status: 200, coordinator: ok, attempts: 1 });
  });

  test("a coordinator that refuses the connection, then one that answers 503: the third try answers", async () => {
    const ok = standIn(200);
    const { status, coordinator, attempts } = await client([nothingListening(), standIn(503), ok]).sendData("hello");
    expect({ status, coordinator, attempts }).toEqual({ status: 200, coordinator: ok, attempts: 3 });
  });

  test("every coordinator failing in every round: ERR_UNREACHABLE after all the tries", async () => {
    await expect(client([nothingListening(), standIn(503)]).sendData("hello")).rejects.toMatchObject({ code: "ERR_UNREACHABLE", status: 503 });
  });
});

describe("MeshClient and limits (issue 20): a 429 is waited out as told, within a bound", () => {
  /** A coordinator that answers 429 (Retry-After: 1) to the first `refusals` requests, then 200; it keeps every body. */
  function limiting(refusals: number) {
    const bodies: string[] = [];
    const server = Bun.serve({
      port: 0,
      hostname: "127.0.0.1",
      tls: mutualTlsServerOptions(loadIdentity(pki, "coordinator")),
      fetch: async (request) => {
        bodies.push(await request.text());
        if (bodies.length <= refusals)
          return Response.json({ error: "over its rate", code: "ERR_RATE_LIMITED" }, { status: 429, headers: { "retry-after": "1" } });
        return Response.json({ result: "ok", id: 7 });
      },
    });
    servers.push(server);
    return { url: `https://127.0.0.1:${server.port}`, bodies };
  }

  test("a 429 with Retry-After is sent again after the wait, the same request (its proof unused), to the same coordinator", async () => {
    const limited = limiting(1);
    const meshClient = client([limited.url, standIn(200)]);
    const started = performance.now();
    const { status, coordinator, attempts } = await meshClient.sendData("hello");
    expect({ status, coordinator, attempts, count: meshClient.limited.count }).toEqual({ status: 200, coordinator: limited.url, attempts: 1, count: 1 });
    // At least the Retry-After, and at most a quarter more: the jitter that keeps refused callers from returning together.
    expect(meshClient.limited.waitedMs).toBeWithin(1000, 1251);
    expect(performance.now() - started).toBeGreaterThanOrEqual(990);
    expect(limited.bodies).toHaveLength(2);
    expect(limited.bodies[1]).toBe(limited.bodies[0]!);
  });

  test("a wait past the bound is not waited: the 429 is the answer", async () => {
    const limited = limiting(5);
    const meshClient = new MeshClient({
      identity: loadIdentity(pki, "client1"),
      fernet: new Fernet(loadFernetKeys(pki)),
      coordinators: [limited.url],
      maxLimitWaitMs: 500,
    });
    const { status, body } = await meshClient.sendData("hello");
    expect({ status, code: body.code, sent: limited.bodies.length, limited: meshClient.limited }).toEqual({
      status: 429,
      code: "ERR_RATE_LIMITED",
      sent: 1,
      limited: { count: 0, waitedMs: 0 },
    });
  });
});
