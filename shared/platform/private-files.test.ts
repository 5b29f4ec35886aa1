// Secret files refused when group or others can read them, and files roles create made private (finding L4).
import { afterEach, describe, expect, test } from "bun:test";
import { chmodSync, cpSync, existsSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { readKeyringFile } from "../token-path/keyring-file.ts";
import { openVault } from "../token-path/vault-binding.ts";
import { EcdhKeyPair, RsaKeyPair } from "../token-path/token-exchange.ts";
import { testPki } from "../testing/pki.ts";
import { loadFernetKeys, readPrivatePkiFile, REPO_ROOT } from "./config.ts";
import { ConfigError } from "./errors.ts";
import { createPrivateFile, ensurePrivateDir, openToOthers, readPrivateFile } from "./private-files.ts";
import { loadIdentity } from "./tls.ts";

const dirs: string[] = [];
afterEach(() => {
  for (const dir of dirs.splice(0)) rmSync(dir, { recursive: true, force: true });
});
function tempDir(): string {
  const dir = mkdtempSync(join(tmpdir(), "securemesh-private-"));
  dirs.push(dir);
  return dir;
}

const modeOf = (path: string) => statSync(path).mode & 0o777;

/** What happens to `fn`: "ok", or the one-line ConfigError it throws. */
/** The KeyServer's keyring, made as its first start makes it (beside a sqlite token store). */
async function makeKeyring(dataDir: string): Promise<void> {
  const { vault } = await openVault({ db: join(dataDir, "tokens.db"), dataDir }, "serve");
  await vault.store.close();
}

function outcome(fn: () => unknown): string {
  try {
    fn();
    return "ok";
  } catch (error) {
    if (!(error instanceof ConfigError)) throw error;
    return error.message;
  }
}

/** A copy of the test PKI (modes kept), for a test that loosens one file. */
async function pkiCopy(): Promise<string> {
  const dir = join(tempDir(), "pki");
  cpSync(await testPki(), dir, { recursive: true });
  return dir;
}

describe("a secret file group or others can read is refused, as OpenSSH refuses one", () => {
  test("the message names the file, its mode and the chmod, relative to the repository when inside it", () => {
    expect(openToOthers(join(REPO_ROOT, "certs", "server_key.pem"), 0o100644)).toBe(
      "certs/server_key.pem is readable by group or others (mode 0644); run chmod 600 certs/server_key.pem",
    );
  });

  test.each([
    [0o600, "ok"],
    [0o400, "ok"],
    [0o700, "ok"],
    [0o640, "readable by group or others (mode 0640)"],
    [0o644, "readable by group or others (mode 0644)"],
    [0o604, "readable by group or others (mode 0604)"],
    [0o620, "writable by group or others (mode 0620)"],
    [0o601, "executable by group or others (mode 0601)"],
  ])("mode %o: %s", (mode, expected) => {
    const path = join(tempDir(), "secret_key.pem");
    writeFileSync(path, "secret", { mode: 0o600 });
    chmodSync(path, mode);
    expect(outcome(() => readPrivateFile(path))).toBe(expected === "ok" ? "ok" : `${path} is ${expected}; run chmod 600 ${path}`);
  });

  test("a missing key says to copy it from the CA host, never to run a command that could make a CA here", () => {
    const dir = tempDir();
    expect(outcome(() => readPrivatePkiFile(dir, "server_key.pem"))).toBe(
      `missing ${dir}/server_key.pem: copy this host's files from the CA host, where ./pki.sh bundle NAME DIR --as server packs this host's identity NAME (./pki.sh issue NAME --server --san … issues it), or point --pki or PKI_DIR at the folder that holds them`,
    );
  });

  test("loadIdentity refuses a 0644 private key; the certificates and the CRL stay public", async () => {
    const pki = await pkiCopy();
    const publicFiles = ["server_cert.pem", "ca_cert.pem", "crl.pem"].map((f) => modeOf(join(pki, f)));
    expect(outcome(() => loadIdentity(pki, "server"))).toBe("ok");
    chmodSync(join(pki, "server_key.pem"), 0o644);
    expect({ publicFiles, server: outcome(() => loadIdentity(pki, "server")) }).toEqual({
      publicFiles: [0o644, 0o644, 0o644],
      server: `${pki}/server_key.pem is readable by group or others (mode 0644); run chmod 600 ${pki}/server_key.pem`,
    });
  });

  test("the Fernet key file at 0644 is refused", async () => {
    const pki = await pkiCopy();
    chmodSync(join(pki, "encryption_key.txt"), 0o644);
    const before = process.env.FERNET_KEY;
    delete process.env.FERNET_KEY;
    try {
      expect(outcome(() => loadFernetKeys(pki))).toBe(
        `${pki}/encryption_key.txt is readable by group or others (mode 0644); run chmod 600 ${pki}/encryption_key.txt`,
      );
    } finally {
      if (before !== undefined) process.env.FERNET_KEY = before;
    }
  });

  test("the KeyServer's own secrets: a loose RSA key, ECDH key or master keyring is refused, never quietly tightened", async () => {
    const dir = tempDir();
    await RsaKeyPair.loadOrCreate(join(dir, "rsa_key.pem"));
    await EcdhKeyPair.loadOrCreate(join(dir, "ecdh_key.pem"));
    await makeKeyring(dir);
    for (const file of ["rsa_key.pem", "ecdh_key.pem", "master_keys.json"]) chmodSync(join(dir, file), 0o640);
    const refused = (file: string) => `${dir}/${file} is readable by group or others (mode 0640); run chmod 600 ${dir}/${file}`;
    expect({
      rsa: await RsaKeyPair.loadOrCreate(join(dir, "rsa_key.pem")).then(
        () => "ok",
        (error: Error) => error.message,
      ),
      ecdh: await EcdhKeyPair.loadOrCreate(join(dir, "ecdh_key.pem")).then(
        () => "ok",
        (error: Error) => error.message,
      ),
      keyring: outcome(() => readKeyringFile(join(dir, "master_keys.json"))),
      stillLoose: modeOf(join(dir, "rsa_key.pem")),
    }).toEqual({ rsa: refused("rsa_key.pem"), ecdh: refused("ecdh_key.pem"), keyring: refused("master_keys.json"), stillLoose: 0o640 });
  });
});

describe("what a role creates is private", () => {
  /** Runs `fn` with a umask that would leave files world-readable and folders world-listable. */
  function underLooseUmask<T>(fn: () => T): T {
    const before = process.umask(0o000);
    try {
      return fn();
    } finally {
      process.umask(before);
    }
  }

  test("createPrivateFile makes 0600 whatever the umask, and never overwrites", () => {
    const path = join(tempDir(), "secret");
    expect(underLooseUmask(() => [createPrivateFile(path, "first"), createPrivateFile(path, "second")])).toEqual([true, false]);
    expect({ mode: modeOf(path), text: readFileSync(path, "utf8") }).toEqual({ mode: 0o600, text: "first" });
  });

  test("ensurePrivateDir makes every missing folder 0700 and leaves an existing one alone", () => {
    const root = tempDir();
    chmodSync(root, 0o755);
    underLooseUmask(() => ensurePrivateDir(join(root, "a", "b")));
    expect([modeOf(root), modeOf(join(root, "a")), modeOf(join(root, "a", "b"))]).toEqual([0o755, 0o700, 0o700]);
  });

  test("the KeyServer's data folder and files: 0700 and 0600, even under umask 000", async () => {
    const data = join(tempDir(), "data", "keyserver");
    const before = process.umask(0o000);
    try {
      await RsaKeyPair.loadOrCreate(join(data, "rsa_key.pem"));
      await EcdhKeyPair.loadOrCreate(join(data, "ecdh_key.pem"));
      await makeKeyring(data);
    } finally {
      process.umask(before);
    }
    expect(["..", ".", "rsa_key.pem", "ecdh_key.pem", "master_keys.json"].map((f) => [f, modeOf(join(data, f))])).toEqual([
      ["..", 0o700],
      [".", 0o700],
      ["rsa_key.pem", 0o600],
      ["ecdh_key.pem", 0o600],
      ["master_keys.json", 0o600],
    ]);
    expect(existsSync(join(data, "master_keys.json.tmp"))).toBe(false);
  });
});
