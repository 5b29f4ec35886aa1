// Preloaded by `bun test` (bunfig.toml): every test file's temporary files, and those of the processes it starts, go
// in one folder of its own, removed when the file's tests are done. Tests make their folders with mkdtemp under
// tmpdir(), which follows $TMPDIR; without this, a run of the unit loop left 272 folders in /tmp (test CAs' keys
// among them). In parallel runs each file gets its own folder; in a serial run, the files share one.
import { afterAll } from "bun:test";
import { chmodSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const outer = process.env.TMPDIR;
const root = mkdtempSync(join(tmpdir(), "securemesh-test-"));
// Traversable, not listable: a Galera node runs as the mysql user in a folder the test made here.
chmodSync(root, 0o711);
process.env.TMPDIR = root;

afterAll(() => {
  if (outer === undefined) delete process.env.TMPDIR;
  else process.env.TMPDIR = outer;
  rmSync(root, { recursive: true, force: true });
});
