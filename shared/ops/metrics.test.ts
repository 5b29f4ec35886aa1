import { describe, expect, test } from "bun:test";
import { Metrics } from "./metrics.ts";
import { parsePrometheus } from "../testing/prometheus.ts";

describe("Metrics", () => {
  test("counters render per label set and parse as Prometheus text", () => {
    const metrics = new Metrics();
    const requests = metrics.counter("test_requests_total", "Requests.", ["route", "status"]);
    requests.inc({ route: "/a", status: "200" });
    requests.inc({ status: "200", route: "/a" }, 2);
    requests.inc({ route: "/b", status: "404" });
    const exposition = parsePrometheus(metrics.render());
    expect(exposition.families.get("test_requests_total")?.type).toBe("COUNTER");
    expect(exposition.value("test_requests_total", { route: "/a", status: "200" })).toBe(3);
    expect(exposition.value("test_requests_total", { route: "/b" })).toBe(1);
  });

  test("label values with quotes, backslashes and newlines are escaped", () => {
    const metrics = new Metrics();
    const hostile = 'a"b\\c\nd';
    metrics.counter("test_total", "Hostile labels.", ["route"]).inc({ route: hostile });
    const { families } = parsePrometheus(metrics.render());
    expect(families.get("test_total")!.metrics[0]!.labels!.route).toBe(hostile);
    expect(metrics.render()).not.toContain("c\nd");
  });

  test("histograms are cumulative, end in +Inf, and count every observation", () => {
    const metrics = new Metrics();
    const latency = metrics.histogram("test_seconds", "Latency.", ["route"], [0.01, 0.1, 1]);
    for (const v of [0.005, 0.05, 0.05, 0.5, 20]) latency.observe({ route: "/x" }, v);
    const text = metrics.render();
    expect(parsePrometheus(text).value("test_seconds", { route: "/x" })).toBe(5);
    expect(text).toContain('test_seconds_bucket{route="/x",le="0.01"} 1');
    expect(text).toContain('test_seconds_bucket{route="/x",le="0.1"} 3');
    expect(text).toContain('test_seconds_bucket{route="/x",le="1"} 4');
    expect(text).toContain('test_seconds_bucket{route="/x",le="+Inf"} 5');
    expect(text).toContain('test_seconds_count{route="/x"} 5');
    expect(text).toContain('test_seconds_sum{route="/x"} 20.605');
  });

  test("collected values are read at scrape time", () => {
    const metrics = new Metrics();
    let hits = 1;
    metrics.collect("test_hits_total", "Hits.", "counter", () => [{ value: hits }]);
    hits = 7;
    expect(parsePrometheus(metrics.render()).value("test_hits_total")).toBe(7);
  });

  test("a second app of the same role shares the family; a clash of kinds is refused", () => {
    const metrics = new Metrics();
    const first = metrics.counter("test_total", "First.");
    expect(metrics.counter("test_total", "Second.")).toBe(first);
    expect(() => metrics.histogram("test_total", "Other kind.")).toThrow(/registered twice/);
    expect(() => metrics.counter("bad-name", "x")).toThrow(/bad metric name/);
  });

  test("the strict reader refuses a broken exposition", () => {
    expect(() => parsePrometheus("x 1")).toThrow(/newline/);
    expect(() => parsePrometheus("x{a=b} 1\n")).toThrow(/sample line/);
    const lying = '# TYPE h histogram\nh_bucket{le="1"} 2\nh_bucket{le="+Inf"} 1\nh_sum 1\nh_count 1\n';
    expect(() => parsePrometheus(lying)).toThrow(/not cumulative/);
    expect(() => parsePrometheus(lying.replace('le="1"} 2', 'le="1"} 1').replace("h_count 1", "h_count 3"))).toThrow(/differs from _count/);
  });
});
