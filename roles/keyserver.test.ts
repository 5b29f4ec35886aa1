import { beforeAll, describe, expect, setDefaultTimeout, test } from "bun:test";
import { mkdtempSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createPublicKey } from "node:crypto";
import type { JWK } from "jose";
import { Authorizer } from "../shared/authz/authorizer.ts";
import { policyPath } from "../shared/platform/config.ts";
import { createLogger } from "../shared/ops/log.ts";
import { Metrics } from "../shared/ops/metrics.ts";
import { bindPeer } from "../shared/platform/runtime/peer.ts";
import { NonceMemory } from "../shared/token-path/replay.ts";
import {
  EcdhKeyPair,
  ON_BEHALF_OF_HEADER,
  openJoseResponse,
  openLegacyResponse,
  prepareEcdhRequest,
  prepareJoseRequest,
  prepareLegacyRequest,
  RsaKeyPair,
  type PreparedRequest,
} from "../shared/token-path/token-exchange.ts";
import type { TokenVault } from "../shared/token-path/token-store.ts";
import { openVault } from "../shared/token-path/vault-binding.ts";
import { scrape } from "../shared/testing/prometheus.ts";
import { testPki } from "../shared/testing/pki.ts";
import { loadIdentity, mutualTlsClientOptions } from "../shared/platform/tls.ts";
import { startTokenStack } from "../harness/fixtures/index.ts";
import { createKeyserverApp, parseKeyserverConfig, type KeyserverDeps } from "./keyserver.ts";
import { testedRuntimes } from "../shared/testing/unit-run.ts";

setDefaultTimeout(30_000);

const TOKEN = "mkt-token-never-logged-42";
const PROXY = "spiffe://securemesh/secureproxy/secureproxy";
const CLIENT1 = "spiffe://securemesh/client/client1";
const CLIENT2 = "spiffe://securemesh/client/client2";
let app: ReturnType<typeof createKeyserverApp>;
let keys: RsaKeyPair;
let vault: TokenVault;
let dir: string;
const logs: string[] = [];

/** A KeyServer app on the shipped policy (roles/policy.json), logging into `lines`. */
function keyserverApp(lines: string[], options: Partial<KeyserverDeps> = {}) {
  const logger = createLogger("keyserver", { format: "text", color: false, write: (l) => lines.push(l) });
  const metrics = new Metrics();
  return createKeyserverApp({
    vault,
    keys,
    nonces: new NonceMemory(),
    logger,
    authz: new Authorizer(policyPath(), logger, metrics),
    legacyReplay: "require",
    metrics,
    ...options,
  });
}

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "securemesh-keyserver-"));
  keys = await RsaKeyPair.loadOrCreate(join(dir, "rsa_key.pem"));
  ({ vault } = await openVault({ db: join(dir, "tokens.db"), dataDir: dir }, "serve"));
  await vault.add("client1", "marketplace", TOKEN);
  app = keyserverApp(logs);
});

interface As {
  /** The TLS caller's identity, as the peer-identity listener sets it. */
  caller?: string;
  /** The on-behalf-of header; null sends none. */
  onBehalfOf?: string | null;
}

function sendTo(
  target: { handle(r: Request): Promise<Response> },
  prepared: Pick<PreparedRequest, "body" | "contentType">,
  { caller = PROXY, onBehalfOf = CLIENT1 }: As = {},
) {
  const headers: Record<string, string> = { "content-type": prepared.contentType };
  if (onBehalfOf !== null) headers[ON_BEHALF_OF_HEADER] = onBehalfOf;
  // What the listener does: the caller is the connection's verified certificate, never a header.
  return target.handle(
    bindPeer(new Request("http://localhost/", { method: "POST", headers, body: prepared.body }), { address: "127.0.0.1", identity: caller, serial: "01" }),
  );
}

const send = (prepared: Pick<PreparedRequest, "body" | "contentType">, as?: As) => sendTo(app, prepared, as);

async function errorOf(response: Response) {
  return { status: response.status, body: await response.json() };
}

/** The original format as the oldest clients sent it: no timestamp, no nonce. */
async function legacyWithoutReplayFields(clientId = "client1") {
  const { timestamp: _t, nonce: _n, ...body } = JSON.parse((await prepareLegacyRequest(keys.publicKey, clientId, "marketplace")).body);
  return { contentType: "application/json" as const, body: JSON.stringify(body) };
}

/** The one answer to every request that does not decrypt, whatever the cause: no padding or format oracle. */
const DECRYPT_FAILED = { status: 400, body: { error: "request could not be decrypted", code: "ERR_DECRYPT" } };

/** Requests that do not decrypt, in both formats: a tampered or short session key, a tampered JWE, garbage. */
async function undecryptable(): Promise<Pick<PreparedRequest, "body" | "contentType">[]> {
  const legacy = await prepareLegacyRequest(keys.publicKey, "client1", "marketplace");
  const body = JSON.parse(legacy.body);
  const wrapped = Buffer.from(body.sessionKey, "base64");
  wrapped[10]! ^= 0xff;
  const tamperedSessionKey = { contentType: "application/json" as const, body: JSON.stringify({ ...body, sessionKey: wrapped.toString("base64") }) };
  const shortKeyCipher = await crypto.subtle.encrypt(
    { name: "RSA-OAEP" },
    await crypto.subtle.importKey("spki", keys.publicKey.export({ type: "spki", format: "der" }), { name: "RSA-OAEP", hash: "SHA-256" }, false, ["encrypt"]),
    new Uint8Array(16),
  );
  const shortSessionKey = {
    contentType: "application/json" as const,
    body: JSON.stringify({ ...body, sessionKey: Buffer.from(shortKeyCipher).toString("base64") }),
  };
  const jose = await prepareJoseRequest(keys.publicKey, "client1", "marketplace");
  const parts = jose.body.split(".");
  const flip = (part: string) => {
    const b = Buffer.from(part, "base64url");
    b[3]! ^= 1;
    return b.toString("base64url");
  };
  const tamperedCiphertext = { contentType: "application/jose" as const, body: [parts[0], parts[1], parts[2], flip(parts[3]!), parts[4]].join(".") };
  const tamperedEncryptedKey = { contentType: "application/jose" as const, body: [parts[0], flip(parts[1]!), parts[2], parts[3], parts[4]].join(".") };
  const garbage = { contentType: "application/jose" as const, body: "not.a.jwe.at.all" };
  return [tamperedSessionKey, shortSessionKey, tamperedCiphertext, tamperedEncryptedKey, garbage];
}

describe("token release", () => {
  test("JOSE: a JWE request gets the token back in a dir/A256GCM JWE", async () => {
    const prepared = await prepareJoseRequest(keys.publicKey, "client1", "marketplace");
    const response = await send(prepared);
    expect([response.status, response.headers.get("content-type")]).toEqual([200, "application/jose"]);
    expect(await openJoseResponse(await response.text(), prepared.sessionKey)).toBe(TOKEN);
  });

  test("the original format: OAEP-wrapped session key in, IV ‖ AES-256-CBC out", async () => {
    const prepared = await prepareLegacyRequest(keys.publicKey, "client1", "marketplace");
    const response = await send(prepared);
    const { token } = (await response.json()) as { token: string };
    expect(response.status).toBe(200);
    expect(openLegacyResponse(token, prepared.sessionKey)).toBe(TOKEN);
    // A fresh IV every time: the same token never encrypts the same way twice.
    const again = (await (await send(await prepareLegacyRequest(keys.publicKey, "client1", "marketplace"))).json()) as { token: string };
    expect(again.token.slice(0, 24)).not.toBe(token.slice(0, 24));
  });

  test("every decryption failure gets the same 400 with no detail", async () => {
    const answers = await Promise.all((await undecryptable()).map(async (r) => errorOf(await send(r))));
    for (const answer of answers) expect(answer).toEqual(DECRYPT_FAILED);
  });

  test("the same request sent three times at once is released once: the replay check holds under concurrency", async () => {
    const prepared = await prepareJoseRequest(keys.publicKey, "client1", "marketplace");
    const answers = await Promise.all([1, 2, 3].map(async () => (await send(prepared)).status));
    expect(answers.sort()).toEqual([200, 401, 401]);
  });

  test("a replayed nonce is refused, and so is a timestamp outside ±300 s", async () => {
    const prepared = await prepareJoseRequest(keys.publicKey, "client1", "marketplace");
    expect((await send(prepared)).status).toBe(200);
    expect(await errorOf(await send(prepared))).toEqual({ status: 401, body: { error: "nonce already used", code: "ERR_REPLAY" } });
    const legacy = JSON.parse((await prepareLegacyRequest(keys.publicKey, "client1", "marketplace")).body);
    const old = { contentType: "application/json" as const, body: JSON.stringify({ ...legacy, timestamp: Math.floor(Date.now() / 1000) - 301 }) };
    expect(await errorOf(await send(old))).toEqual({ status: 401, body: { error: "timestamp outside the accepted window", code: "ERR_REPLAY" } });
  });

  test("only identities with tokens.fetch may ask: a client1 certificate gets 403", async () => {
    const prepared = await prepareJoseRequest(keys.publicKey, "client1", "marketplace");
    expect(await errorOf(await send(prepared, { caller: CLIENT1, onBehalfOf: null }))).toEqual({
      status: 403,
      body: { error: `${CLIENT1} lacks permission tokens.fetch`, code: "ERR_FORBIDDEN" },
    });
    expect((await send(prepared, { caller: "" })).status).toBe(403);
  });

  test("unknown clientId/tokenType gets 404, bad format 400, wrong type 415", async () => {
    // client1 may use only client1/marketplace, so an unknown token is asked for on behalf of a wider grant.
    const wide = join(dir, "wide-policy.json");
    writeFileSync(
      wide,
      JSON.stringify({
        rules: [
          { identity: PROXY, allow: ["tokens.fetch"] },
          { identity: CLIENT1, allow: ["proxy.use:*"] },
        ],
      }),
    );
    const lines: string[] = [];
    const logger = createLogger("keyserver", { write: (l) => lines.push(l) });
    const wideApp = keyserverApp(lines, { authz: new Authorizer(wide, logger), logger });
    expect((await sendTo(wideApp, await prepareJoseRequest(keys.publicKey, "nobody", "marketplace"))).status).toBe(404);
    expect(await errorOf(await send({ contentType: "application/json", body: "{nope" }))).toEqual({
      status: 400,
      body: { error: "request body is not valid JSON", code: "ERR_BAD_REQUEST" },
    });
    expect((await send({ contentType: "application/json", body: JSON.stringify({ clientId: "client1" }) })).status).toBe(400);
    expect((await send({ contentType: "text/plain" as "application/json", body: "x" })).status).toBe(415);
  });
});

// #13: ECDH-ES (X25519) beside RSA-OAEP-256, for clients that opt in; the original format and RSA JOSE unchanged.
describe("ECDH-ES requests, the opt-in", () => {
  let ecdh: EcdhKeyPair;
  let ecdhApp: ReturnType<typeof createKeyserverApp>;

  beforeAll(async () => {
    ecdh = await EcdhKeyPair.loadOrCreate(join(dir, "ecdh_key.pem"));
    ecdhApp = keyserverApp([], { ecdh });
  });

  test("the X25519 key is made once, stored 0600, and published in the JWKS beside the RSA key", async () => {
    const again = await EcdhKeyPair.loadOrCreate(join(dir, "ecdh_key.pem"));
    expect({ same: again.jwk.x === ecdh.jwk.x, mode: statSync(join(dir, "ecdh_key.pem")).mode & 0o777 }).toEqual({ same: true, mode: 0o600 });
    const jwks = (await (await ecdhApp.handle(new Request("http://localhost/.well-known/jwks.json"))).json()) as { keys: Record<string, unknown>[] };
    expect(jwks.keys).toEqual([keys.jwk, { kty: "OKP", crv: "X25519", x: ecdh.jwk.x, kid: expect.any(String), use: "enc", alg: "ECDH-ES" }]);
    expect(jwks.keys[1]).not.toHaveProperty("d");
  });

  test("an ECDH-ES request gets the token; its replay is refused; RSA requests are served as before", async () => {
    const prepared = await prepareEcdhRequest(ecdh.publicKey, "client1", "marketplace");
    expect(JSON.parse(Buffer.from(prepared.body.split(".")[0]!, "base64url").toString())).toMatchObject({ alg: "ECDH-ES", enc: "A256GCM" });
    expect(await openJoseResponse(await (await sendTo(ecdhApp, prepared)).text(), prepared.sessionKey)).toBe(TOKEN);
    expect(await errorOf(await sendTo(ecdhApp, prepared))).toEqual({ status: 401, body: { error: "nonce already used", code: "ERR_REPLAY" } });
    const rsa = await prepareJoseRequest(keys.publicKey, "client1", "marketplace");
    expect(await openJoseResponse(await (await sendTo(ecdhApp, rsa)).text(), rsa.sessionKey)).toBe(TOKEN);
  });

  test("without the opt-in, or to another key, an ECDH-ES request is the same 400 as any that does not decrypt, with the opt-in too", async () => {
    expect(await errorOf(await send(await prepareEcdhRequest(ecdh.publicKey, "client1", "marketplace")))).toEqual(DECRYPT_FAILED);
    const stranger = await EcdhKeyPair.loadOrCreate(join(dir, "stranger_ecdh_key.pem"));
    expect(await errorOf(await sendTo(ecdhApp, await prepareEcdhRequest(stranger.publicKey, "client1", "marketplace")))).toEqual(DECRYPT_FAILED);
    // With the opt-in, whatever does not decrypt in either format is still the one 400.
    for (const undecrypted of await undecryptable()) expect(await errorOf(await sendTo(ecdhApp, undecrypted))).toEqual(DECRYPT_FAILED);
    expect(parseKeyserverConfig([]).ecdhEs).toBe(false);
    expect(parseKeyserverConfig(["--ecdh-es"]).ecdhEs).toBe(true);
  });
});

// #11 H1: the KeyServer released any client's token to the proxy, and its audit named only the proxy.
describe("on behalf of whom", () => {
  test("the identity the proxy asks for needs proxy.use on that token: client2 cannot get client1's", async () => {
    const prepared = await prepareJoseRequest(keys.publicKey, "client1", "marketplace");
    expect(await errorOf(await send(prepared, { onBehalfOf: CLIENT2 }))).toEqual({
      status: 403,
      body: { error: `${CLIENT2} lacks permission proxy.use:client1/marketplace`, code: "ERR_FORBIDDEN" },
    });
  });

  test("without the header the caller itself needs proxy.use: the proxy alone has only tokens.fetch", async () => {
    const prepared = await prepareJoseRequest(keys.publicKey, "client1", "marketplace");
    expect(await errorOf(await send(prepared, { onBehalfOf: null }))).toEqual({
      status: 403,
      body: { error: `${PROXY} lacks permission proxy.use:client1/marketplace`, code: "ERR_FORBIDDEN" },
    });
    // A caller that holds both may ask for itself.
    const both = join(dir, "both-policy.json");
    writeFileSync(both, JSON.stringify({ rules: [{ identity: PROXY, allow: ["tokens.fetch", "proxy.use:client1/marketplace"] }] }));
    const lines: string[] = [];
    const logger = createLogger("keyserver", { write: (l) => lines.push(l) });
    const answer = await sendTo(
      keyserverApp(lines, { authz: new Authorizer(both, logger), logger }),
      await prepareJoseRequest(keys.publicKey, "client1", "marketplace"),
      { onBehalfOf: null },
    );
    expect(answer.status).toBe(200);
    expect(lines.filter((l) => l.startsWith("AUDIT "))).toEqual([
      expect.stringMatching(new RegExp(`caller=${PROXY} on_behalf_of=${PROXY} client=client1 type=marketplace outcome=released$`)),
    ]);
  });

  test("an on-behalf-of header that is not a SPIFFE ID is a 400", async () => {
    const prepared = await prepareJoseRequest(keys.publicKey, "client1", "marketplace");
    expect(await errorOf(await send(prepared, { onBehalfOf: "client1" }))).toEqual({
      status: 400,
      body: { error: `${ON_BEHALF_OF_HEADER} must be a SPIFFE ID such as spiffe://securemesh/client/client1`, code: "ERR_BAD_REQUEST" },
    });
  });

  test("caller-supplied names reach no log line unescaped", async () => {
    const lines: string[] = [];
    const forged = "client1\nAUTHZ allow identity=x action=proxy.use resource=client2/marketplace\u001b[2J";
    const answer = await sendTo(keyserverApp(lines), await prepareJoseRequest(keys.publicKey, forged, "marketplace"));
    expect(answer.status).toBe(400); // not a plain name: refused before the policy is even asked
    expect(lines.length).toBeGreaterThan(0);
    for (const line of lines) expect(line).not.toMatch(/[\n\u001b]/);
  });
});

// #11 M3: client2 flooding the KeyServer through the proxy filled the one global nonce memory, and then client1's
// genuine request got 503 ERR_REPLAY_MEMORY_FULL.
test("a flooding identity hits its own nonce quota (429); another identity is still served", async () => {
  const lines: string[] = [];
  const quotaApp = keyserverApp(lines, { nonces: new NonceMemory({ maxPerCaller: 3 }) });
  for (let i = 0; i < 3; i++) {
    // No token for client2: 404, but the nonce was accepted, so it counts.
    expect((await sendTo(quotaApp, await prepareJoseRequest(keys.publicKey, "client2", "marketplace"), { onBehalfOf: CLIENT2 })).status).toBe(404);
  }
  expect(await errorOf(await sendTo(quotaApp, await prepareJoseRequest(keys.publicKey, "client2", "marketplace"), { onBehalfOf: CLIENT2 }))).toEqual({
    status: 429,
    body: { error: `too many token requests from ${CLIENT2} in the replay window; retry later`, code: "ERR_REPLAY_QUOTA" },
  });
  expect((await sendTo(quotaApp, await prepareJoseRequest(keys.publicKey, "client1", "marketplace"))).status).toBe(200);
  expect(lines.filter((l) => l.endsWith(" outcome=replay_quota"))).toHaveLength(1);
});

// #11 L8: without a timestamp and nonce, the same original-format body was released 3 times.
describe("the original format's replay fields", () => {
  test("are required by default: a body without them is refused, every time", async () => {
    const oldClient = await legacyWithoutReplayFields();
    for (let i = 0; i < 3; i++) {
      expect(await errorOf(await send(oldClient))).toEqual({
        status: 401,
        body: { error: "timestamp and nonce are required (old clients need the KeyServer's --legacy-replay allow)", code: "ERR_REPLAY" },
      });
    }
  });

  test("with --legacy-replay allow, old clients are served as before", async () => {
    const oldClient = await legacyWithoutReplayFields();
    const allowApp = keyserverApp([], { legacyReplay: "allow" });
    for (let i = 0; i < 3; i++) expect((await sendTo(allowApp, oldClient)).status).toBe(200);
    // Fields that are sent are still checked.
    const withFields = await prepareLegacyRequest(keys.publicKey, "client1", "marketplace");
    expect((await sendTo(allowApp, withFields)).status).toBe(200);
    expect((await sendTo(allowApp, withFields)).status).toBe(401);
  });

  test("prepareLegacyRequest always sends them", async () => {
    const body = JSON.parse((await prepareLegacyRequest(keys.publicKey, "client1", "marketplace")).body);
    expect(body).toMatchObject({ timestamp: expect.any(Number), nonce: expect.stringMatching(/^[A-Za-z0-9_-]{16,128}$/) });
  });

  test("--legacy-replay takes require or allow, require by default", () => {
    expect(parseKeyserverConfig([]).legacyReplay).toBe("require");
    expect(parseKeyserverConfig(["--legacy-replay", "allow"]).legacyReplay).toBe("allow");
    expect(() => parseKeyserverConfig(["--legacy-replay", "maybe"])).toThrow("--legacy-replay must be require or allow");
    expect(parseKeyserverConfig([]).replayQuota).toBe(10_000);
  });
});

describe("audit", () => {
  test("an error's audit line carries its code", async () => {
    // A seal moved to another row does not open: 500 ERR_SEAL, which the audit line must name (#11 M4).
    const row = (await vault.store.get("client1", "marketplace"))!;
    await vault.store.put({ ...row, clientId: "client2" });
    const answer = await send(await prepareJoseRequest(keys.publicKey, "client2", "marketplace"), { onBehalfOf: CLIENT2 });
    expect(await errorOf(answer)).toEqual({ status: 500, body: { error: "stored secret cannot be opened", code: "ERR_SEAL" } });
    expect(logs.at(-1)).toMatch(new RegExp(`caller=${PROXY} on_behalf_of=${CLIENT2} client=client2 type=marketplace outcome=error code=ERR_SEAL$`));
  });

  test("one audit line per attempt, with caller, on-behalf-of and outcome, and never the token", () => {
    const audit = logs.filter((l) => l.startsWith("AUDIT "));
    expect(audit.length).toBeGreaterThanOrEqual(10);
    expect(audit.some((l) => l.endsWith(`caller=${PROXY} on_behalf_of=${CLIENT1} client=client1 type=marketplace outcome=released`))).toBe(true);
    expect(audit.some((l) => l.endsWith(`caller=${CLIENT1} on_behalf_of=${CLIENT1} client=- type=- outcome=forbidden`))).toBe(true);
    expect(audit.some((l) => l.endsWith(`caller=${PROXY} on_behalf_of=${CLIENT2} client=client1 type=marketplace outcome=forbidden`))).toBe(true);
    expect(audit.some((l) => / outcome=replay$/.test(l))).toBe(true);
    expect(audit.some((l) => / outcome=decrypt_error$/.test(l))).toBe(true);
    expect(logs.join("\n")).not.toContain(TOKEN);
  });

  test("every authorization decision is one AUTHZ line", () => {
    expect(logs.some((l) => l.startsWith(`AUTHZ allow identity=${PROXY} action=tokens.fetch`))).toBe(true);
    expect(logs.some((l) => l.startsWith(`AUTHZ deny identity=${CLIENT2} action=proxy.use resource=client1/marketplace`))).toBe(true);
  });

  test("/metrics counts releases by outcome, one for each audit line", async () => {
    const metrics = await scrape(app);
    const audit = logs.filter((l) => l.startsWith("AUDIT "));
    for (const outcome of ["released", "forbidden", "replay", "decrypt_error", "error"]) {
      const lines = audit.filter((l) => new RegExp(` outcome=${outcome}( code=\\S+)?$`).test(l)).length;
      expect(lines).toBeGreaterThan(0);
      expect(metrics.value("securemesh_token_releases_total", { outcome })).toBe(lines);
    }
    expect(metrics.value("securemesh_authz_decisions_total", { identity: CLIENT2, action: "proxy.use", decision: "deny" })).toBeGreaterThan(0);
  });
});

describe("keys", () => {
  test("public_key (GET and POST) and the JWKS carry the same key", async () => {
    const get = (await (await app.handle(new Request("http://localhost/public_key"))).json()) as { public_key: string };
    const post = (await (await app.handle(new Request("http://localhost/public_key", { method: "POST" }))).json()) as { public_key: string };
    const jwks = (await (await app.handle(new Request("http://localhost/.well-known/jwks.json"))).json()) as { keys: Record<string, unknown>[] };
    expect(post).toEqual(get);
    const fromJwk = createPublicKey({ key: jwks.keys[0] as never, format: "jwk" }).export({ type: "spki", format: "pem" });
    expect(fromJwk).toBe(get.public_key);
    expect(jwks.keys[0]).toMatchObject({ kty: "RSA", use: "enc", alg: "RSA-OAEP-256", kid: expect.any(String) });
  });

  test("the RSA key is made once, stored 0600, and reused after a restart", async () => {
    const again = await RsaKeyPair.loadOrCreate(join(dir, "rsa_key.pem"));
    expect(again.publicPem).toBe(keys.publicPem);
    expect(statSync(join(dir, "rsa_key.pem")).mode & 0o777).toBe(0o600);
  });
});

// The KeyServer as a process on each runtime, with the ECDH-ES opt-in (#13): jose and WebCrypto's X25519 and
// RSA-OAEP on Bun and on Deno, over the peer-identity listener that reads a certificate once per connection.
describe.each(testedRuntimes())("a KeyServer process on %s", (runtime) => {
  test("releases over mutual TLS in both formats, RSA and ECDH-ES; a replay and a tampered JWE are refused", async () => {
    const pki = await testPki();
    await using tokens = await startTokenStack({ pki, runtime, keyserverArgs: ["--ecdh-es"] });
    expect(await tokens.cluster.role("keyserver").waitForLine(/keyserver listening/)).toEndWith("; ECDH-ES (X25519) too)");
    const tls = mutualTlsClientOptions(loadIdentity(pki, "secureproxy"));
    const publicKey = createPublicKey(((await (await fetch(`${tokens.keyserver}/public_key`, { tls })).json()) as { public_key: string }).public_key);
    const post = (prepared: Pick<PreparedRequest, "body" | "contentType">) =>
      fetch(tokens.keyserver, {
        method: "POST",
        headers: { "content-type": prepared.contentType, [ON_BEHALF_OF_HEADER]: CLIENT1 },
        body: prepared.body,
        tls,
      });

    // 24 at once: below the cap on handshakes from one address (32), which a burst of new connections would meet.
    const jwks = (await (await fetch(`${tokens.keyserver}/.well-known/jwks.json`, { tls })).json()) as { keys: JWK[] };
    const x25519 = createPublicKey({ key: jwks.keys.find((k) => k.crv === "X25519")!, format: "jwk" });
    const requests = await Promise.all(
      Array.from({ length: 24 }, (_, i) =>
        i % 4 === 0
          ? prepareLegacyRequest(publicKey, "client1", "marketplace")
          : i % 4 === 1
            ? prepareEcdhRequest(x25519, "client1", "marketplace")
            : prepareJoseRequest(publicKey, "client1", "marketplace"),
      ),
    );
    const released = await Promise.all(
      requests.map(async (prepared) => {
        const response = await post(prepared);
        if (prepared.contentType === "application/jose") return openJoseResponse(await response.text(), prepared.sessionKey);
        return openLegacyResponse(((await response.json()) as { token: string }).token, prepared.sessionKey);
      }),
    );
    expect(released).toEqual(requests.map(() => tokens.token));

    expect(await errorOf(await post(requests[1]!))).toEqual({ status: 401, body: { error: "nonce already used", code: "ERR_REPLAY" } });
    const parts = (await prepareJoseRequest(publicKey, "client1", "marketplace")).body.split(".");
    const tampered = [...parts.slice(0, 4), Buffer.from(Buffer.from(parts[4]!, "base64url").map((b) => b ^ 1)).toString("base64url")].join(".");
    expect(await errorOf(await post({ contentType: "application/jose", body: tampered }))).toEqual(DECRYPT_FAILED);
    // The whole path through the SecureProxy on the same runtime.
    expect((await tokens.requestApi({ ClientId: "client1", TokenType: "marketplace", ApiUri: tokens.itemUri })).status).toBe(200);
  });
});
