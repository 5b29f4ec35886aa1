// The answer a TLS gate writes itself, as raw HTTP/1.1 onto the client's connection, which is then closed: a refused
// connection's reason (admission.ts). Every other answer is the app's.
import type { ErrorCode } from "../errors.ts";
import type { RefusalAnswer } from "./admission.ts";

const REASON_PHRASES: Record<number, string> = {
  403: "Forbidden",
  429: "Too Many Requests",
};

/** A JSON error answer `{"error", "code"}` with `connection: close`, head and body in one string. */
export function rawAnswer(status: number, error: string, code: ErrorCode, headers: Record<string, string> = {}): string {
  const body = JSON.stringify({ error, code });
  const head = Object.entries({
    ...headers,
    "content-type": "application/json; charset=utf-8",
    "content-length": String(Buffer.byteLength(body)),
    connection: "close",
  })
    .map(([name, value]) => `${name}: ${value}\r\n`)
    .join("");
  return `HTTP/1.1 ${status} ${REASON_PHRASES[status] ?? "Error"}\r\n${head}\r\n${body}`;
}

/** The answer a refused connection gets to its first request. */
export function rawRefusal(answer: RefusalAnswer): string {
  return rawAnswer(answer.status, answer.error, answer.code, answer.headers);
}
