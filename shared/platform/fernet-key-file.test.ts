// The key file's format: files from before read as they always did, markers say which key only decrypts, and no
// error ever quotes a key.
import { describe, expect, test } from "bun:test";
import { describeFernetKeys, fernetKeyFingerprint, fernetKeysInOrder, formatFernetKeyFile, parseFernetKeyFile } from "./fernet-key-file.ts";

const [A, B, C] = [
  "cw_0x689RpI-jtRR7oE8h_eQsKImvJapLeSbXpwF4e4=",
  "Zm9vYmFyYmF6cXV4cXV1eGZvb2JhcmJhenF1eHF1dXg=",
  "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY=",
];
const order = (text: string) => fernetKeysInOrder(parseFernetKeyFile(text, "encryption_key.txt"));
const refusal = (text: string) => {
  try {
    parseFernetKeyFile(text, "encryption_key.txt");
    return "accepted";
  } catch (error) {
    return (error as Error).message;
  }
};

describe("files from before", () => {
  test("one key per line, newest first: the first encrypts, all decrypt, as before", () => {
    expect(order(`${A}\n${B}\n`)).toEqual([A, B]);
    expect(order(`${A}\n`)).toEqual([A]);
    expect(order(`${A}`)).toEqual([A]); // pki.sh's file with its newline taken off
  });

  test("$FERNET_KEY's forms: commas or spaces between keys, keys without padding", () => {
    expect(order(`${A},${B}`)).toEqual([A, B]);
    expect(order(`${A} ${B}\r\n`)).toEqual([A, B]);
    expect(order(A.replace(/=$/, ""))).toEqual([A.replace(/=$/, "")]);
  });
});

describe("decrypt-only markers", () => {
  test("a marked key never encrypts, wherever it stands; the first unmarked key is the primary", () => {
    const file = parseFernetKeyFile(`# header\n\n${B}  # decrypt-only, added 2026-05-01T10:00:00Z\n${A}  # primary\n${C}\n`, "f");
    expect(fernetKeysInOrder(file)).toEqual([A, B, C]);
    expect(file.decryptOnly.map((e) => [e.role, e.added?.toISOString()])).toEqual([
      ["decrypt-only", "2026-05-01T10:00:00.000Z"],
      ["decrypt-only", undefined],
    ]);
  });

  test("format then parse gives the same keys, roles and dates", () => {
    const file = parseFernetKeyFile(
      `${B} # primary, added 2026-05-01T10:00:00Z, promoted 2026-05-01T10:01:00Z\n${A} # decrypt-only, encrypted until 2026-05-01T10:01:00Z\n`,
      "f",
    );
    const text = formatFernetKeyFile(file);
    expect(parseFernetKeyFile(text, "f")).toEqual(file);
    expect(text.split("\n").filter((l) => !l.startsWith("#"))).toEqual([
      `${B}  # primary, added 2026-05-01T10:00:00Z, promoted 2026-05-01T10:01:00Z`,
      `${A}  # decrypt-only, encrypted until 2026-05-01T10:01:00Z`,
      "",
    ]);
  });

  test("a key listed twice counts once, where it first appears", () => {
    expect(order(`${A}\n${B}\n${A} # decrypt-only\n`)).toEqual([A, B]);
  });
});

describe("refusals name the line, never the key", () => {
  test.each([
    ["empty", "", "no Fernet key in encryption_key.txt: copy the key file from the CA host (docs/pki.md)"],
    ["comments only", "# nothing\n", "no Fernet key in encryption_key.txt: copy the key file from the CA host (docs/pki.md)"],
    ["a short key", `${A}\n${A.slice(0, 20)}\n`, "encryption_key.txt line 2: not a Fernet key (url-safe base64 of 32 bytes); fix or remove that line"],
    ["standard base64", A.replace("_", "/"), "encryption_key.txt line 1: not a Fernet key (url-safe base64 of 32 bytes); fix or remove that line"],
    [
      "every key decrypt-only",
      `${A} # decrypt-only\n${B} # decrypt-only\n`,
      "encryption_key.txt: every key is marked decrypt-only, so none would encrypt; promote one (fernet-keys.ts promote)",
    ],
  ])("%s", (_, text, message) => {
    expect(refusal(text)).toBe(message);
  });

  test("a key one character off is not echoed", () => {
    const typo = A.slice(0, 10) + "!" + A.slice(11);
    expect(refusal(`${typo}\n`)).not.toContain(A.slice(0, 10));
  });
});

test("fingerprints: 8 hex digits, the same padded or not, different per key; descriptions show only those", () => {
  expect(fernetKeyFingerprint(A)).toMatch(/^[0-9a-f]{8}$/);
  expect(fernetKeyFingerprint(A.replace(/=$/, ""))).toBe(fernetKeyFingerprint(A));
  expect(fernetKeyFingerprint(B)).not.toBe(fernetKeyFingerprint(A));
  expect(describeFernetKeys([A, B])).toBe(`2 keys, primary ${fernetKeyFingerprint(A)}, decrypt-only ${fernetKeyFingerprint(B)}`);
  expect(describeFernetKeys([A])).toBe(`1 key, primary ${fernetKeyFingerprint(A)}`);
});
