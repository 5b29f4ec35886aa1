// Real PKIs for tests, built by pki.sh into temporary folders (once per test process and name).
import { mkdtempSync, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { REPO_ROOT } from "../platform/config.ts";

const built = new Map<string, Promise<string>>();

/** A folder holding a PKI made by pki.sh; `label` separates independent CAs ("main", "other"). */
export function testPki(label = "main", extraArgs: string[] = []): Promise<string> {
  const key = `${label} ${extraArgs.join(" ")}`;
  let dir = built.get(key);
  if (!dir) {
    dir = (async () => {
      const path = mkdtempSync(join(tmpdir(), `securemesh-pki-${label}-`));
      await using proc = Bun.spawn(["bash", join(REPO_ROOT, "pki.sh"), ...extraArgs], {
        env: { ...process.env, PKI_DIR: path },
        stdout: "pipe",
        stderr: "pipe",
      });
      const [stderr, exitCode] = await Promise.all([new Response(proc.stderr).text(), proc.exited]);
      if (exitCode !== 0) throw new Error(`pki.sh failed (${exitCode}): ${stderr}`);
      return path;
    })();
    built.set(key, dir);
  }
  return dir;
}

/** Runs `./pki.sh ARGS` against the PKI in `dir`, failing with its stderr. */
export async function runPkiSh(dir: string, ...args: string[]): Promise<void> {
  await using proc = Bun.spawn(["bash", join(REPO_ROOT, "pki.sh"), ...args], { env: { ...process.env, PKI_DIR: dir }, stdout: "pipe", stderr: "pipe" });
  const [stderr, code] = await Promise.all([new Response(proc.stderr).text(), proc.exited]);
  if (code !== 0) throw new Error(`pki.sh ${args.join(" ")} failed (${code}): ${stderr}`);
}

/** A PKI of its own with an extra client `x`: the CRL from before `x` was revoked, and the one after. */
export async function revocationPki(label: string): Promise<{ dir: string; crlBefore: string; crlAfter: string }> {
  const dir = mkdtempSync(join(tmpdir(), `securemesh-pki-${label}-`));
  await runPkiSh(dir);
  await runPkiSh(dir, "issue", "x", "--client");
  const crlBefore = readFileSync(join(dir, "crl.pem"), "utf8");
  await runPkiSh(dir, "revoke", "x");
  return { dir, crlBefore, crlAfter: readFileSync(join(dir, "crl.pem"), "utf8") };
}
