import { describe, expect, test } from "bun:test";
import fernetPackage from "fernet";
import { InvalidToken } from "../platform/errors.ts";
import { Fernet, generateFernetKey } from "./fernet.ts";
import { runPython } from "../testing/python.ts";
import generate from "./testdata/fernet/generate.json";
import invalid from "./testdata/fernet/invalid.json";
import verify from "./testdata/fernet/verify.json";

const seconds = (iso: string) => Math.floor(Date.parse(iso) / 1000);

describe("fernet spec vectors", () => {
  test.each(generate)("generate: $src", (v) => {
    expect(new Fernet(v.secret).encrypt(v.src, { now: seconds(v.now), iv: new Uint8Array(v.iv) })).toBe(v.token);
  });

  test.each(verify)("verify: $src", (v) => {
    expect(new Fernet(v.secret).decryptText(v.token, { ttl: v.ttl_sec, now: seconds(v.now) })).toBe(v.src);
  });

  test.each(invalid)("invalid: $desc", (v) => {
    expect(() => new Fernet(v.secret).decrypt(v.token, { ttl: v.ttl_sec, now: seconds(v.now) })).toThrow(InvalidToken);
  });
});

describe("Fernet", () => {
  test("round trip of text and bytes", () => {
    const f = new Fernet(generateFernetKey());
    expect(f.decryptText(f.encrypt("héllo wörld"))).toBe("héllo wörld");
    const bytes = new Uint8Array([0, 255, 1, 2, 3]);
    expect([...f.decrypt(f.encrypt(bytes))]).toEqual([...bytes]);
  });

  test("every failure raises the same error with the same message", () => {
    const f = new Fernet(generateFernetKey());
    const token = f.encrypt("secret");
    const tampered = token.slice(0, 40) + (token[40] === "A" ? "B" : "A") + token.slice(41);
    const cases = ["not a token", tampered, new Fernet(generateFernetKey()).encrypt("secret"), f.encrypt("old", { now: 1000 })];
    const messages = cases.map((c) => {
      try {
        f.decrypt(c, { ttl: 60 });
        return "accepted";
      } catch (e) {
        expect(e).toBeInstanceOf(InvalidToken);
        return (e as Error).message;
      }
    });
    expect(new Set(messages)).toEqual(new Set(["invalid or expired token"]));
  });

  test("TTL: accepted inside, refused after, and a far-future stamp is refused", () => {
    const f = new Fernet(generateFernetKey());
    const token = f.encrypt("x", { now: 1_000_000 });
    expect(f.decryptText(token, { ttl: 60, now: 1_000_060 })).toBe("x");
    expect(() => f.decrypt(token, { ttl: 60, now: 1_000_061 })).toThrow(InvalidToken);
    expect(() => f.decrypt(token, { ttl: 60, now: 1_000_000 - 61 })).toThrow(InvalidToken);
    expect(f.decryptText(token, { ttl: 60, now: 1_000_000 - 60 })).toBe("x");
  });

  test("rotation: encrypts with the first key, decrypts with any", () => {
    const [oldKey, newKey] = [generateFernetKey(), generateFernetKey()];
    const oldToken = new Fernet(oldKey).encrypt("before");
    const rotated = new Fernet([newKey, oldKey]);
    expect(rotated.decryptText(oldToken)).toBe("before");
    expect(new Fernet(newKey).decryptText(rotated.encrypt("after"))).toBe("after");
    expect(() => new Fernet(oldKey).decrypt(rotated.encrypt("after"))).toThrow(InvalidToken);
  });

  test("rotate: the message under the primary, with the token's own timestamp, whatever its age", () => {
    const [oldKey, newKey] = [generateFernetKey(), generateFernetKey()];
    const stamp = 1_000_000; // decades old: rotate checks no TTL
    const oldToken = new Fernet(oldKey).encrypt("stored long ago", { now: stamp });
    const rotated = new Fernet([newKey, oldKey]).rotate(oldToken);
    expect(rotated).not.toBe(oldToken);
    expect(new Fernet(newKey).decryptText(rotated)).toBe("stored long ago");
    expect(() => new Fernet(oldKey).decrypt(rotated)).toThrow(InvalidToken);
    const timestamp = (token: string) => Buffer.from(token, "base64url").readBigUInt64BE(1);
    expect(timestamp(rotated)).toBe(BigInt(stamp));
    // A TTL check says of the rotated token what it said of the original.
    expect(new Fernet(newKey).decryptText(rotated, { ttl: 60, now: stamp + 60 })).toBe("stored long ago");
    expect(() => new Fernet(newKey).decrypt(rotated, { ttl: 60, now: stamp + 61 })).toThrow(InvalidToken);
    // No key in force opens it: InvalidToken, as decrypt says.
    expect(() => new Fernet(newKey).rotate(oldToken)).toThrow(InvalidToken);
  });

  test("keyIndex: the place of the key whose MAC checks, -1 for none or for what is not a token", () => {
    const [a, b, c] = [generateFernetKey(), generateFernetKey(), generateFernetKey()];
    const f = new Fernet([a, b]);
    expect(f.keyIndex(new Fernet(a).encrypt("x"))).toBe(0);
    expect(f.keyIndex(new Fernet(b).encrypt("x"))).toBe(1);
    expect(f.keyIndex(new Fernet(c).encrypt("x"))).toBe(-1);
    expect(f.keyIndex("not a token")).toBe(-1);
    f.setKeys([b, a]);
    expect(f.keyIndex(new Fernet(a).encrypt("x"))).toBe(1);
  });

  test("decryptText: a plaintext that is not UTF-8 is an InvalidToken", () => {
    const f = new Fernet(generateFernetKey());
    expect(() => f.decryptText(f.encrypt(new Uint8Array([0xff, 0xfe])))).toThrow(InvalidToken);
  });

  test("rejects malformed keys", () => {
    expect(() => new Fernet("short")).toThrow("32 bytes");
    expect(() => new Fernet([])).toThrow("at least one key");
  });
});

describe("interop with independent implementations", () => {
  const key = generateFernetKey();
  const ours = new Fernet(key);

  test("Python cryptography opens our token and we open Python's", async () => {
    const ourToken = ours.encrypt("from bun ✓");
    const out = await runPython(
      `import sys, json
from cryptography.fernet import Fernet
f = Fernet(${JSON.stringify(key)}.encode())
ours = sys.stdin.read().strip()
print(json.dumps({"opened": f.decrypt(ours, ttl=60).decode(), "theirs": f.encrypt("from python ✓".encode()).decode()}))`,
      ourToken,
    );
    const { opened, theirs } = JSON.parse(out);
    expect(opened).toBe("from bun ✓");
    expect(ours.decryptText(theirs, { ttl: 60 })).toBe("from python ✓");
  });

  test("our rotate agrees with Python's MultiFernet.rotate: same message, same timestamp, under the new key", async () => {
    const [oldKey, newKey] = [generateFernetKey(), generateFernetKey()];
    const oldToken = new Fernet(oldKey).encrypt("rotate me", { now: 1_700_000_000 });
    const ourRotation = new Fernet([newKey, oldKey]).rotate(oldToken);
    const out = await runPython(
      `import sys, json
from cryptography.fernet import Fernet, MultiFernet
old, new = Fernet(${JSON.stringify(oldKey)}.encode()), Fernet(${JSON.stringify(newKey)}.encode())
ours, token = sys.stdin.read().split()
theirs = MultiFernet([new, old]).rotate(token.encode())
print(json.dumps({"stamps": [new.extract_timestamp(theirs), new.extract_timestamp(ours.encode())], "opened": new.decrypt(ours.encode()).decode(), "theirs": theirs.decode()}))`,
      `${ourRotation} ${oldToken}`,
    );
    const { stamps, opened, theirs } = JSON.parse(out);
    expect({ stamps, opened }).toEqual({ stamps: [1_700_000_000, 1_700_000_000], opened: "rotate me" });
    expect(new Fernet(newKey).decryptText(theirs)).toBe("rotate me");
  });

  test("the npm fernet package opens our token and we open its", () => {
    const secret = new fernetPackage.Secret(key);
    const theirs = new fernetPackage.Token({ secret, ttl: 0 }).encode("from fernet.js");
    expect(ours.decryptText(theirs)).toBe("from fernet.js");
    expect(new fernetPackage.Token({ secret, token: ours.encrypt("from bun"), ttl: 0 }).decode()).toBe("from bun");
  });
});
