// The one log format of every role: plain lines (Flask-style access lines) or, with LOG_FORMAT=json, JSON lines.
import { writeSync } from "node:fs";
import { NETWORK_REASONS } from "../platform/runtime/network-errors.ts";
import { NetworkError } from "../platform/runtime/types.ts";

export type Level = "info" | "warn" | "error";

export interface Logger {
  readonly role: string;
  info(message: string, fields?: Record<string, unknown>): void;
  warn(message: string, fields?: Record<string, unknown>): void;
  error(message: string, fields?: Record<string, unknown>): void;
  /**
   * One access line per HTTP request, in the seed's Flask/werkzeug format, followed by the request's trace
   * (shared/ops/trace.ts) when given: `… "GET /health HTTP/1.1" 200 - trace=4bf92f3577b34da6a3ce929d0e0e4736`.
   */
  access(remote: string, method: string, path: string, status: number, trace?: TraceField): void;
}

/** The id an access line carries: a trace id, or a request id (shared/ops/trace.ts's Trace). */
export interface TraceField {
  readonly field: "trace" | "request_id";
  readonly id: string;
}

export interface LoggerOptions {
  format?: "text" | "json";
  color?: boolean;
  write?: (line: string) => void;
  now?: () => Date;
}

const COLORS: Record<Level, string> = { info: "", warn: "\x1b[33m", error: "\x1b[31m" };
const MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];

/** werkzeug's access-log date: 22/Nov/2026 23:19:42 */
export function accessDate(d: Date): string {
  const pad = (n: number) => String(n).padStart(2, "0");
  return `${pad(d.getDate())}/${MONTHS[d.getMonth()]}/${d.getFullYear()} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
}

/** accessDate, formatted once per second rather than once per request (an access line per request, #13). */
function cachedAccessDate(): (d: Date) => string {
  let second = NaN;
  let text = "";
  return (d) => {
    const now = Math.floor(d.getTime() / 1000);
    if (now !== second) [second, text] = [now, accessDate(d)];
    return text;
  };
}

/**
 * stdout in batches: lines written in one turn of the event loop go out in one write, at its end or every 64 KiB.
 * A write per line was 6-7% of a coordinator's CPU under load (#13). What is still buffered when the process
 * exits is written synchronously then, so no line is lost to an orderly exit (a kill -9 loses at most the lines of
 * the turn it lands in).
 */
function batchedStdout(): (line: string) => void {
  let pending: string[] = [];
  let size = 0;
  const flush = () => {
    if (pending.length === 0) return;
    const chunk = pending.join("");
    pending = [];
    size = 0;
    process.stdout.write(chunk);
  };
  process.once("exit", () => {
    if (pending.length > 0) writeSync(1, pending.join(""));
    pending = [];
  });
  return (line) => {
    if (pending.length === 0) setImmediate(flush);
    pending.push(line + "\n");
    size += line.length + 1;
    if (size >= 65_536) flush();
  };
}

/** The process's own stdout writer, shared by every logger in it (one batch, one order). */
let processStdout: ((line: string) => void) | undefined;

function defaultColor(): boolean {
  if (process.env.NO_COLOR) return false;
  return Boolean(process.env.FORCE_COLOR) || Boolean(process.stdout.isTTY);
}

export function createLogger(role: string, options: LoggerOptions = {}): Logger {
  const format = options.format ?? (process.env.LOG_FORMAT === "json" ? "json" : "text");
  const color = options.color ?? defaultColor();
  if (!options.write) processStdout ??= batchedStdout();
  const write = options.write ?? processStdout!;
  const now = options.now ?? (() => new Date());
  const dateOf = cachedAccessDate();

  // Every line goes out through here, escaped (#11 L1): messages carry caller-supplied text (a server's error text,
  // a request path), which must not start a line of its own or reach the terminal as an escape sequence.
  const emit = (level: Level, message: string, fields: Record<string, unknown> = {}) => {
    if (format === "json") {
      write(jsonLine({ time: now().toISOString(), level, role, msg: message }, fields));
    } else if (color && COLORS[level]) {
      write(`${COLORS[level]}${printable(message)}\x1b[0m`); // only the logger's own colour codes stay real
    } else {
      write(printable(message));
    }
  };

  return {
    role,
    info: (message, fields) => emit("info", message, fields),
    warn: (message, fields) => emit("warn", message, fields),
    error: (message, fields) => emit("error", message, fields),
    access(remote, method, path, status, trace) {
      if (format === "json") {
        emit("info", "access", { remote, method, path, status, ...(trace ? { [trace.field]: trace.id } : {}) });
        return;
      }
      const line = `${remote} - - [${dateOf(now())}] "${method} ${path} HTTP/1.1" ${status} -${trace ? ` ${trace.field}=${trace.id}` : ""}`;
      emit(status >= 500 ? "error" : status >= 400 ? "warn" : "info", line);
    },
  };
}

/**
 * One JSON line. JSON.stringify escapes control characters but not U+2028/U+2029, which some viewers break lines
 * at; a bigint would make it throw. The logger's own keys come first and cannot be overwritten by a field.
 */
function jsonLine(own: Record<string, unknown>, fields: Record<string, unknown>): string {
  const text = JSON.stringify({ ...own, ...fields, ...own }, (_key, value: unknown) => (typeof value === "bigint" ? String(value) : value));
  return text.replace(/[\u2028\u2029]/g, (c) => `\\u${c.charCodeAt(0).toString(16)}`);
}

/** Describes a caught error without its stack or payload, for a log line. */
export function describeError(error: unknown): string {
  if (error instanceof Error) {
    const code = (error as { code?: unknown }).code;
    return typeof code === "string" && !error.message.startsWith(code) ? `${code}: ${error.message}` : error.message;
  }
  return String(error);
}

/**
 * Why a fetch failed, short enough for a log line or an error: "timeout", "connection refused (ECONNREFUSED)", …
 * The same on both runtimes: the adapters' fetch gives one set of codes (a NetworkError), whatever the runtime said.
 */
export function describeNetworkError(error: unknown): string {
  if ((error as { name?: string }).name === "TimeoutError") return "timeout";
  // The adapters' NetworkErrors get their short reason; anything else, such as an identity check's refusal
  // ("reached spiffe://…, expected …"), says more in its own message.
  return error instanceof NetworkError ? `${NETWORK_REASONS[error.code]} (${error.code})` : describeError(error);
}

/**
 * Keeps one log line one line: caller-supplied text cannot forge log entries with newlines or escapes. C0 and C1
 * controls become \xNN; the Unicode line and paragraph separators, which some viewers break lines at, \uNNNN.
 */
export function printable(text: string): string {
  // Bidi overrides and isolates too: they cannot break a line, but can make one read as something else.
  return text.replace(/[\u0000-\u001f\u007f-\u009f\u2028\u2029\u202a-\u202e\u2066-\u2069]/g, (c) => {
    const code = c.charCodeAt(0);
    return code > 0xff ? `\\u${code.toString(16)}` : `\\x${code.toString(16).padStart(2, "0")}`;
  });
}
