// Times RSA-2048 OAEP (SHA-256) private decrypts with the runtime's WebCrypto, which jose uses for the KeyServer's
// JWE, in a process of its own, on Bun or on Deno: what bounds token releases on each runtime (issue 22 Goal 3).
// Usage: bun harness/rsa-timer.ts SECONDS < key.pem, or deno run -A harness/rsa-timer.ts SECONDS < key.pem; prints
// decrypts per second.
import { createPrivateKey } from "node:crypto";
import process from "node:process";
import { text } from "node:stream/consumers";

const seconds = Number(process.argv[2]);
if (!(seconds > 0)) {
  console.error("usage: harness/rsa-timer.ts SECONDS < key.pem");
  process.exit(2);
}
const der = createPrivateKey(await text(process.stdin)).export({ format: "der", type: "pkcs8" });
const algorithm = { name: "RSA-OAEP", hash: "SHA-256" };
const privateKey = await crypto.subtle.importKey("pkcs8", der, algorithm, true, ["decrypt"]);
const { kty, n, e } = await crypto.subtle.exportKey("jwk", privateKey);
const publicKey = await crypto.subtle.importKey("jwk", { kty, n, e }, algorithm, false, ["encrypt"]);
// A 32-byte content key, as a JWE with A256GCM wraps.
const wrapped = await crypto.subtle.encrypt({ name: "RSA-OAEP" }, publicKey, new Uint8Array(32));
const decrypt = () => crypto.subtle.decrypt({ name: "RSA-OAEP" }, privateKey, wrapped);

// One at a time, as one core: 10 decrypts between reads of the clock.
let count = 0;
const started = performance.now();
let elapsed = 0;
while (elapsed < seconds * 1000) {
  for (let i = 0; i < 10; i++) await decrypt();
  count += 10;
  elapsed = performance.now() - started;
}
console.log((count * 1000) / elapsed);
