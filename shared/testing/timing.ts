// Upper bounds on wall time in tests. The tests share two cores with the rest of the suite, so how late
// something may happen is a mark, not a benchmark: bounds on lateness go through lateBound(), widened by
// SECUREMESH_TIMING_SLACK (default 2; 1 checks the tight figure on a quiet machine). Lower bounds, such as "not cut off
// before its deadline", stay exact: they are the promise, and load only makes them easier to meet.

/** How much later than its tight figure a timed event may come in a test; at least 1. */
export const TIMING_SLACK = Math.max(1, Number(process.env.SECUREMESH_TIMING_SLACK) || 2);

/** The upper bound on a wall time of `ms` on a quiet machine, as a test on a shared one may assert it. */
export function lateBound(ms: number): number {
  return ms * TIMING_SLACK;
}
