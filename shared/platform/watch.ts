// Reload without a restart: files are polled for changes (mtime, size, inode: editors and pki.sh replace files
// by rename, which fs.watch misses on some platforms), and SIGHUP asks every watcher to reload at once.
import { statSync } from "node:fs";

/** How often watched files are polled; a `./pki.sh revoke` or a policy edit takes effect within this. */
export const RELOAD_INTERVAL_MS = 1000;

const hangupListeners = new Set<() => void>();
let hangupInstalled = false;

function fingerprint(paths: readonly string[]): string {
  return paths
    .map((path) => {
      try {
        const s = statSync(path);
        return `${s.ino}:${s.size}:${s.mtimeMs}`;
      } catch {
        return "missing";
      }
    })
    .join("|");
}

export interface Watch {
  stop(): void;
}

/**
 * Calls `onChange` when any of `paths` changes (a file appearing or vanishing counts), and on SIGHUP.
 * `onChange` runs one at a time; a change seen while it runs triggers it once more afterwards.
 */
export function watchFiles(paths: readonly string[], onChange: () => unknown, options: { intervalMs?: number } = {}): Watch {
  let seen = fingerprint(paths);
  let running = false;
  let again = false;
  const run = async () => {
    if (running) {
      again = true;
      return;
    }
    running = true;
    try {
      do {
        again = false;
        seen = fingerprint(paths);
        await onChange();
      } while (again);
    } finally {
      running = false;
    }
  };
  const timer = setInterval(() => {
    if (fingerprint(paths) !== seen) void run();
  }, options.intervalMs ?? RELOAD_INTERVAL_MS);
  timer.unref?.();
  hangupListeners.add(run);
  if (!hangupInstalled) {
    hangupInstalled = true;
    process.on("SIGHUP", () => hangupListeners.forEach((listener) => listener()));
  }
  return {
    stop() {
      clearInterval(timer);
      hangupListeners.delete(run);
    },
  };
}
