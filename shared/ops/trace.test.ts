import { expect, test } from "bun:test";
import { parseTraceparent, REQUEST_ID_HEADER, startTrace, traceOf, TRACEPARENT_HEADER } from "./trace.ts";

const VALID = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

test("a well-formed traceparent is continued: same trace id and flags, this hop as the new parent", () => {
  const trace = traceOf(new Headers({ traceparent: VALID }));
  expect({ field: trace.field, id: trace.id }).toEqual({ field: "trace", id: "4bf92f3577b34da6a3ce929d0e0e4736" });
  const sent = parseTraceparent(trace.outbound[TRACEPARENT_HEADER]!)!;
  expect(sent.traceId).toBe("4bf92f3577b34da6a3ce929d0e0e4736");
  expect(sent.flags).toBe("01");
  expect(sent.parentId).not.toBe("00f067aa0ba902b7");
  expect(trace.outbound).toBe(trace.outbound); // one span per hop: every onward call names the same parent
  expect(Object.keys(trace.outbound)).toEqual([TRACEPARENT_HEADER]);
});

test("a malformed traceparent is replaced by a new trace, and nothing of it is kept", () => {
  const malformed = [
    "",
    "garbage",
    VALID.toUpperCase(),
    VALID + "-extra",
    VALID.slice(0, -1),
    ` ${VALID}x`,
    "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", // a later version is not parsed
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-1",
    "00-4bf92f3577b34da6a3ce929d0e0e4736\t-00f067aa0ba902b7-01",
    "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01\u001b[2J",
    `${VALID}, ${VALID}`, // two traceparent headers, as Headers joins them
  ];
  for (const value of malformed) {
    const headers = new Headers();
    headers.append(TRACEPARENT_HEADER, value);
    const trace = traceOf(headers);
    expect({ value, field: trace.field, fresh: /^[0-9a-f]{32}$/.test(trace.id) && trace.id !== "4bf92f3577b34da6a3ce929d0e0e4736" }).toEqual({
      value,
      field: "trace",
      fresh: true,
    });
    expect(parseTraceparent(trace.outbound[TRACEPARENT_HEADER]!)?.traceId).toBe(trace.id);
  }
});

test("without a traceparent, a well-formed X-Request-Id is kept and sent on; any other is replaced", () => {
  const kept = traceOf(new Headers({ [REQUEST_ID_HEADER]: "req-42.a:b_c" }));
  expect({ field: kept.field, id: kept.id, outbound: kept.outbound }).toEqual({
    field: "request_id",
    id: "req-42.a:b_c",
    outbound: { [REQUEST_ID_HEADER]: "req-42.a:b_c" },
  });
  for (const value of ["", "has space", "x".repeat(129), "a\u001b[2Jb", "a/b", "ünïcode", 'a"b']) {
    const headers = new Headers();
    try {
      headers.set(REQUEST_ID_HEADER, value);
    } catch {
      continue; // not even a header value
    }
    const trace = traceOf(headers);
    expect({ value, field: trace.field, replaced: trace.id !== value && /^[0-9a-f-]{36}$/.test(trace.id) }).toEqual({
      value,
      field: "request_id",
      replaced: true,
    });
  }
  const none = traceOf(new Headers());
  expect(none.field).toBe("request_id");
  expect(none.outbound).toEqual({ [REQUEST_ID_HEADER]: none.id });
  expect(traceOf(new Headers()).id).not.toBe(none.id);
});

test("a traceparent wins over an X-Request-Id", () => {
  const trace = traceOf(new Headers({ traceparent: VALID, [REQUEST_ID_HEADER]: "req-1" }));
  expect(trace.id).toBe("4bf92f3577b34da6a3ce929d0e0e4736");
  expect(Object.keys(trace.outbound)).toEqual([TRACEPARENT_HEADER]);
});

test("startTrace begins a sampled trace that the next hop continues", () => {
  const first = startTrace();
  const next = traceOf(new Headers(first.outbound));
  expect(next.id).toBe(first.id);
  expect(parseTraceparent(first.outbound[TRACEPARENT_HEADER]!)?.flags).toBe("01");
  expect(startTrace().id).not.toBe(first.id);
});
