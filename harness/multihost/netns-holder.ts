// For netns.test.ts: makes test hosts named on the command line, starts a process in the first, prints the
// namespaces and that PID on one line, and waits to be killed (SIGTERM cleans up; SIGKILL leaves a stale set).
import { createTestNetwork } from "./netns.ts";

const network = await createTestNetwork({ hosts: process.argv.slice(2) });
const first = [...network.hosts.values()][0]!;
const sleeper = Bun.spawn(first.exec(["sleep", "infinity"]), { stdio: ["ignore", "ignore", "ignore"] });
console.log([...network.hosts.values()].map((h) => h.ns).join(" ") + ` ${sleeper.pid}`);
setInterval(() => {}, 1 << 30); // stays up until a signal ends it
