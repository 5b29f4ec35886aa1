// ProxyClient's failover between SecureProxies (issue 23), against stand-in proxies over real mutual TLS.
import { afterEach, beforeAll, describe, expect, test } from "bun:test";
import { loadIdentity, mutualTlsServerOptions } from "../platform/tls.ts";
import { testPki } from "../testing/pki.ts";
import { ProxyClient } from "./proxy-client.ts";

let pki: string;
beforeAll(async () => {
  pki = await testPki("main");
});

const servers: Bun.Server<unknown>[] = [];
const clients: ProxyClient[] = [];
afterEach(() => {
  for (const server of servers.splice(0)) server.stop(true);
  for (const client of clients.splice(0)) client.close();
});

/** A stand-in proxy presenting `certificate`'s identity; it counts the calls it gets and answers `status`. */
function standIn(status: number, certificate = "secureproxy") {
  const calls: unknown[] = [];
  const server = Bun.serve({
    port: 0,
    hostname: "127.0.0.1",
    tls: mutualTlsServerOptions(loadIdentity(pki, certificate)),
    async fetch(request) {
      calls.push(await request.json());
      return Response.json(status === 200 ? { item: { id: 1 } } : { error: "KeyServer unavailable", code: "ERR_UNAVAILABLE" }, { status });
    },
  });
  servers.push(server);
  return { url: `https://127.0.0.1:${server.port}`, calls };
}

/** A URL where nothing listens: a port that was free a moment ago. */
function nothingListening(): string {
  const server = Bun.serve({ port: 0, hostname: "127.0.0.1", fetch: () => new Response() });
  const url = `https://127.0.0.1:${server.port}`;
  server.stop(true);
  return url;
}

const CALL = { ClientId: "client1", TokenType: "marketplace", ApiUri: "https://localhost:5005/api/item" };

function client(proxies: string[]) {
  const made = new ProxyClient({ identity: loadIdentity(pki, "client1"), proxies, backoffMs: 1, timeoutMs: 5000 });
  clients.push(made);
  return made;
}

describe("ProxyClient failover", () => {
  test("a proxy that refuses the connection, then one that answers 503: the third answers, and the dead one is tried last next time", async () => {
    const dead = nothingListening();
    const busy = standIn(503);
    const ok = standIn(200);
    const proxies = client([dead, busy.url, ok.url]);
    expect(await proxies.requestApi(CALL)).toMatchObject({ status: 200, proxy: ok.url, attempts: 3, body: { item: { id: 1 } } });
    expect(await proxies.requestApi(CALL)).toMatchObject({ status: 200, proxy: ok.url, attempts: 1 });
    expect([busy.calls, ok.calls]).toEqual([[CALL], [CALL, CALL]]);
  });

  test("any other answer is the caller's: a 403 is not sent to the next proxy", async () => {
    const refusing = standIn(403);
    const next = standIn(200);
    expect(await client([refusing.url, next.url]).requestApi(CALL)).toMatchObject({ status: 403, proxy: refusing.url, attempts: 1 });
    expect(next.calls).toEqual([]);
  });

  test("a proxy address answered by another identity receives nothing; the next proxy is asked", async () => {
    const impostor = standIn(200, "server");
    const ok = standIn(200);
    expect(await client([impostor.url, ok.url]).requestApi(CALL)).toMatchObject({ status: 200, proxy: ok.url, attempts: 2 });
    expect(impostor.calls).toEqual([]);
  });

  test("no proxy answering in any round: ERR_UNREACHABLE naming the last failure", async () => {
    await expect(client([nothingListening(), standIn(503).url]).requestApi(CALL)).rejects.toMatchObject({
      code: "ERR_UNREACHABLE",
      status: 503,
      message: expect.stringMatching(/^no SecureProxy could serve the request \(https:\/\/127\.0\.0\.1:\d+ answered 503: KeyServer unavailable; trace=/),
    });
  });
});

describe("ProxyClient and limits (issue 20)", () => {
  test("a 429 with Retry-After is waited out and the same call sent again to the same proxy; past the bound the 429 is the answer", async () => {
    let refusals = 1;
    const calls: unknown[] = [];
    const server = Bun.serve({
      port: 0,
      hostname: "127.0.0.1",
      tls: mutualTlsServerOptions(loadIdentity(pki, "secureproxy")),
      async fetch(request) {
        calls.push(await request.json());
        if (refusals-- > 0) return Response.json({ error: "over its rate", code: "ERR_RATE_LIMITED" }, { status: 429, headers: { "retry-after": "1" } });
        return Response.json({ item: { id: 1 } });
      },
    });
    servers.push(server);
    const url = `https://127.0.0.1:${server.port}`;
    const answer = await client([url, standIn(200).url]).requestApi(CALL);
    expect({ status: answer.status, proxy: answer.proxy, calls }).toEqual({ status: 200, proxy: url, calls: [CALL, CALL] });

    refusals = 10;
    const impatient = new ProxyClient({ identity: loadIdentity(pki, "client1"), proxies: [url], maxLimitWaitMs: 0 });
    clients.push(impatient);
    expect((await impatient.requestApi(CALL)).status).toBe(429);
  });
});
