// Times securemesh's Fernet in a process of its own, as PYTHON_TIMERS in bench.ts times Python's: the bench's own
// process carries the load generator's heap and timers, which cost the in-process figure up to 3.6x (issue 22 Goal 5).
// Usage: bun harness/fernet-timer.ts encrypt|decrypt SECONDS < key; prints operations per second.
import { Fernet } from "../shared/request-path/fernet.ts";

const [what, seconds] = [Bun.argv[2], Number(Bun.argv[3])];
if ((what !== "encrypt" && what !== "decrypt") || !(seconds > 0)) {
  console.error("usage: bun harness/fernet-timer.ts encrypt|decrypt SECONDS < key");
  process.exit(2);
}
const fernet = new Fernet((await Bun.stdin.text()).trim());
const message = "x".repeat(1024);
const token = fernet.encrypt(message);
const op = what === "encrypt" ? () => fernet.encrypt(message) : () => fernet.decrypt(token);

// The same loop as Python's: 50 operations between reads of the clock.
let count = 0;
const started = performance.now();
let elapsed = 0;
while (elapsed < seconds * 1000) {
  for (let i = 0; i < 50; i++) op();
  count += 50;
  elapsed = performance.now() - started;
}
console.log((count * 1000) / elapsed);
