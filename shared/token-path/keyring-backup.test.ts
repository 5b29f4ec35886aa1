// Issue 23: the keyring's backup may sit off the host, so it is sealed under a passphrase; a wrong passphrase and an
// altered file are each refused in one clear line, and an altered header cannot make the derivation cost gigabytes.
import { describe, expect, test } from "bun:test";
import { ConfigError } from "../platform/errors.ts";
import { newKey, wrapKey } from "./keyring.ts";
import { MIN_PASSPHRASE, openBackup, sealBackup, type KeyringBackup } from "./keyring-backup.ts";

const PASSPHRASE = "correct horse battery staple";
/** The lowest cost openBackup accepts: these tests check the format, not scrypt's cost. */
const CHEAP = { N: 2 ** 14, r: 8, p: 1 };

function backup(): KeyringBackup {
  const key = newKey();
  return {
    keyring: "0123456789abcdef",
    store: { id: "fedcba9876543210", at: "mysql 10.0.0.1:3306,10.0.0.2:3306/test" },
    key,
    versions: [wrapKey(key, "fedcba9876543210", 2, newKey())],
    archived: [wrapKey(key, "fedcba9876543210", 1, newKey())],
  };
}

const refusal = (fn: () => unknown): string => {
  try {
    fn();
    return "opened";
  } catch (error) {
    expect(error).toBeInstanceOf(ConfigError);
    return (error as Error).message;
  }
};

describe("keyring backup", () => {
  test("round trip: the same keyring comes back, and the file shows neither the keyring key nor a wrapped key", () => {
    const original = backup();
    const text = sealBackup(original, PASSPHRASE, CHEAP);
    for (const secret of [original.key.toString("base64"), original.versions[0]!.wrapped, original.archived[0]!.wrapped]) expect(text).not.toContain(secret);
    expect(JSON.parse(text)).toMatchObject({
      securemesh: "keyring-backup",
      format: 1,
      keyring: original.keyring,
      store: "mysql 10.0.0.1:3306,10.0.0.2:3306/test (store id fedcba9876543210)",
      cipher: "aes-256-gcm",
      kdf: { name: "scrypt", ...CHEAP },
    });
    expect(openBackup(text, PASSPHRASE, "b.json")).toEqual(original);
    // The default cost is the one the docs state.
    expect(JSON.parse(sealBackup(original, PASSPHRASE)).kdf).toMatchObject({ N: 2 ** 17, r: 8, p: 1 });
  });

  test("a wrong passphrase is one clear line", () => {
    const text = sealBackup(backup(), PASSPHRASE, CHEAP);
    expect(refusal(() => openBackup(text, "correct horse battery stapler", "b.json"))).toBe("the passphrase does not open b.json (wrong passphrase)");
  });

  test("a file altered after export is one clear line, whichever part was changed", () => {
    const text = sealBackup(backup(), PASSPHRASE, CHEAP);
    const file = JSON.parse(text) as Record<string, string>;
    const flipped = (value: string) => {
      const bytes = Buffer.from(value, "base64");
      bytes[bytes.length >> 1]! ^= 1;
      return bytes.toString("base64");
    };
    const altered = [
      { ...file, ciphertext: flipped(file.ciphertext!) },
      { ...file, nonce: flipped(file.nonce!) },
      { ...file, store: "mysql 10.6.6.6:3306/evil (store id fedcba9876543210)" },
      { ...file, keyring: "ffffffffffffffff" },
    ];
    for (const changed of altered) {
      expect(refusal(() => openBackup(JSON.stringify(changed), PASSPHRASE, "b.json"))).toBe(
        "b.json was altered after it was exported: it does not authenticate under its passphrase; use another copy of the backup",
      );
    }
    expect(refusal(() => openBackup(text.slice(0, 100), PASSPHRASE, "b.json"))).toBe("b.json is not a securemesh keyring backup (not JSON)");
  });

  test("a header asking for more work than this version ever writes is refused before scrypt runs", () => {
    const file = JSON.parse(sealBackup(backup(), PASSPHRASE, CHEAP)) as { kdf: Record<string, number> };
    const started = performance.now();
    for (const kdf of [
      { ...file.kdf, N: 2 ** 30 },
      { ...file.kdf, N: 3 * 2 ** 14 },
      { ...file.kdf, r: 64 },
      { ...file.kdf, p: 1000 },
    ]) {
      expect(refusal(() => openBackup(JSON.stringify({ ...file, kdf }), PASSPHRASE, "b.json"))).toBe(
        "b.json is not a securemesh keyring backup (key derivation outside the bounds this version writes)",
      );
    }
    expect(performance.now() - started).toBeLessThan(1000);
  });

  test(`a passphrase shorter than ${MIN_PASSPHRASE} characters is refused at export`, () => {
    expect(refusal(() => sealBackup(backup(), "short", CHEAP))).toBe(
      `the passphrase is shorter than ${MIN_PASSPHRASE} characters: a backup that may sit off the host needs a longer one`,
    );
  });
});
