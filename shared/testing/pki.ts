// Real PKIs for tests, built by pki.sh into temporary folders (once per test process and name).
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { REPO_ROOT } from "../config.ts";

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
