// Runs Python, an implementation no one here wrote, as an oracle in tests.

/** The interpreter with `cryptography` and `requests`; CI may point PYTHON at /usr/bin/python3. */
export const PYTHON = process.env.PYTHON ?? "python3";

/** Runs a Python snippet with `stdin` (and sys.argv[1:] = args), returning trimmed stdout; throws with stderr when it exits non-zero. */
export async function runPython(code: string, stdin = "", env: Record<string, string> = {}, args: string[] = [], python = PYTHON): Promise<string> {
  await using proc = Bun.spawn([python, "-c", code, ...args], {
    stdin: new TextEncoder().encode(stdin),
    stdout: "pipe",
    stderr: "pipe",
    env: { ...process.env, ...env },
  });
  const [stdout, stderr, exitCode] = await Promise.all([new Response(proc.stdout).text(), new Response(proc.stderr).text(), proc.exited]);
  if (exitCode !== 0) throw new Error(`python exited ${exitCode}: ${stderr.trim()}`);
  return stdout.trim();
}
