import { beforeAll, describe, expect, test } from "bun:test";
import { mkdtempSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createPublicKey } from "node:crypto";
import { MasterKeyring } from "../shared/keyring.ts";
import { createLogger } from "../shared/log.ts";
import { PEER_HEADER } from "../shared/peer-tls.ts";
import { NonceMemory } from "../shared/replay.ts";
import {
  openJoseResponse, openLegacyResponse, prepareJoseRequest, prepareLegacyRequest, RsaKeyPair, type PreparedRequest,
} from "../shared/token-exchange.ts";
import { openTokenStore, TokenVault } from "../shared/token-store.ts";
import { scrape } from "../shared/testing/prometheus.ts";
import { createKeyserverApp } from "./keyserver.ts";

const TOKEN = "mkt-token-never-logged-42";
let app: ReturnType<typeof createKeyserverApp>;
let keys: RsaKeyPair;
let dir: string;
const logs: string[] = [];

beforeAll(async () => {
  dir = mkdtempSync(join(tmpdir(), "securemesh-keyserver-"));
  keys = await RsaKeyPair.loadOrCreate(join(dir, "rsa_key.pem"));
  const vault = new TokenVault(await openTokenStore(join(dir, "tokens.db")), MasterKeyring.open(join(dir, "master_keys.json")));
  await vault.add("client1", "marketplace", TOKEN);
  const logger = createLogger("keyserver", { format: "text", color: false, write: (l) => logs.push(l) });
  app = createKeyserverApp({ vault, keys, nonces: new NonceMemory(), logger, allowedCallers: ["secureproxy"] });
});

function send(prepared: Pick<PreparedRequest, "body" | "contentType">, caller = "secureproxy") {
  return app.handle(new Request("http://localhost/", {
    method: "POST", headers: { "content-type": prepared.contentType, [PEER_HEADER]: caller }, body: prepared.body,
  }));
}

async function errorOf(response: Response) {
  return { status: response.status, body: await response.json() };
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
    const legacy = await prepareLegacyRequest(keys.publicKey, "client1", "marketplace");
    const body = JSON.parse(legacy.body);
    const wrapped = Buffer.from(body.sessionKey, "base64");
    wrapped[10]! ^= 0xff;
    const tamperedSessionKey = { contentType: "application/json" as const, body: JSON.stringify({ ...body, sessionKey: wrapped.toString("base64") }) };
    const shortKeyCipher = await crypto.subtle.encrypt({ name: "RSA-OAEP" },
      await crypto.subtle.importKey("spki", keys.publicKey.export({ type: "spki", format: "der" }), { name: "RSA-OAEP", hash: "SHA-256" }, false, ["encrypt"]),
      new Uint8Array(16));
    const shortSessionKey = { contentType: "application/json" as const, body: JSON.stringify({ ...body, sessionKey: Buffer.from(shortKeyCipher).toString("base64") }) };
    const jose = await prepareJoseRequest(keys.publicKey, "client1", "marketplace");
    const parts = jose.body.split(".");
    const flip = (part: string) => { const b = Buffer.from(part, "base64url"); b[3]! ^= 1; return b.toString("base64url"); };
    const tamperedCiphertext = { contentType: "application/jose" as const, body: [parts[0], parts[1], parts[2], flip(parts[3]!), parts[4]].join(".") };
    const tamperedEncryptedKey = { contentType: "application/jose" as const, body: [parts[0], flip(parts[1]!), parts[2], parts[3], parts[4]].join(".") };
    const garbage = { contentType: "application/jose" as const, body: "not.a.jwe.at.all" };

    const answers = await Promise.all([tamperedSessionKey, shortSessionKey, tamperedCiphertext, tamperedEncryptedKey, garbage].map(async (r) => errorOf(await send(r))));
    for (const answer of answers) expect(answer).toEqual({ status: 400, body: { error: "request could not be decrypted", code: "ERR_DECRYPT" } });
  });

  test("a replayed nonce is refused, and so is a timestamp outside ±300 s", async () => {
    const prepared = await prepareJoseRequest(keys.publicKey, "client1", "marketplace");
    expect((await send(prepared)).status).toBe(200);
    expect(await errorOf(await send(prepared))).toEqual({ status: 401, body: { error: "nonce already used", code: "ERR_REPLAY" } });
    const legacy = JSON.parse((await prepareLegacyRequest(keys.publicKey, "client1", "marketplace")).body);
    const old = { contentType: "application/json" as const, body: JSON.stringify({ ...legacy, timestamp: Math.floor(Date.now() / 1000) - 301 }) };
    expect(await errorOf(await send(old))).toEqual({ status: 401, body: { error: "timestamp outside the accepted window", code: "ERR_REPLAY" } });
  });

  test("only the SecureProxy role may ask: a client1 certificate gets 403", async () => {
    const prepared = await prepareJoseRequest(keys.publicKey, "client1", "marketplace");
    expect(await errorOf(await send(prepared, "client1"))).toEqual({ status: 403, body: { error: "caller 'client1' may not request tokens", code: "ERR_FORBIDDEN" } });
  });

  test("unknown clientId/tokenType gets 404, bad format 400, wrong type 415", async () => {
    expect((await send(await prepareJoseRequest(keys.publicKey, "nobody", "marketplace"))).status).toBe(404);
    expect(await errorOf(await send({ contentType: "application/json", body: "{nope" }))).toEqual({ status: 400, body: { error: "request body is not valid JSON", code: "ERR_BAD_REQUEST" } });
    expect((await send({ contentType: "application/json", body: JSON.stringify({ clientId: "client1" }) })).status).toBe(400);
    expect((await send({ contentType: "text/plain" as "application/json", body: "x" })).status).toBe(415);
  });

  test("one audit line per attempt, with caller and outcome, and never the token", () => {
    const audit = logs.filter((l) => l.startsWith("AUDIT "));
    expect(audit.length).toBeGreaterThanOrEqual(10);
    expect(audit.some((l) => /caller=secureproxy client=client1 type=marketplace outcome=released$/.test(l))).toBe(true);
    expect(audit.some((l) => /caller=client1 client=- type=- outcome=forbidden$/.test(l))).toBe(true);
    expect(audit.some((l) => / outcome=replay$/.test(l))).toBe(true);
    expect(audit.some((l) => / outcome=decrypt_error$/.test(l))).toBe(true);
    expect(logs.join("\n")).not.toContain(TOKEN);
  });

  test("/metrics counts releases by outcome, one for each audit line", async () => {
    const metrics = await scrape(app);
    const audit = logs.filter((l) => l.startsWith("AUDIT "));
    for (const outcome of ["released", "forbidden", "replay", "decrypt_error", "not_found"]) {
      const lines = audit.filter((l) => l.endsWith(` outcome=${outcome}`)).length;
      expect(lines).toBeGreaterThan(0);
      expect(metrics.value("securemesh_token_releases_total", { outcome })).toBe(lines);
    }
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
