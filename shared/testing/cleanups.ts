// One way for a test file to undo what each test started (listeners, sockets, stores): pushed as it is made, run in
// reverse after every test, so a failed assertion still stops what the test left running.
import { afterEach } from "bun:test";

export type Cleanup = () => Promise<unknown> | unknown;

/** Registers an afterEach that runs, last first, every cleanup pushed onto the returned list during the test. */
export function cleanupAfterEach(): Cleanup[] {
  const cleanups: Cleanup[] = [];
  afterEach(async () => {
    for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
  });
  return cleanups;
}
