// AsynDM per-pixel timestep curves (docs: method.md, "Per-pixel schedule curves" and "Start").
// Pure functions, no ComfyUI import: the schedule plot draws them and the browser test checks
// them against the Python reference (asyndm.schedules.step).
//
// Conventions (same as asyndm.schedules):
//   s          current timestep of a pixel (float); the state starts at T + offset = 1001
//   remaining  steps left after the current one (r = N - i - 1 at step i); r = 0 -> next value 0
//   target     the scheduler's offset (1); every curve reaches it after r steps
//   the first model call is at step(1001, remaining = N) = 1001 - 1000 / N for the background.
// This file is also served as an extension module by ComfyUI (every .js under web/ is imported):
// it only defines functions.

export const NUM_TRAIN_TIMESTEPS = 1000;
export const OFFSET = 1;
export const START = NUM_TRAIN_TIMESTEPS + OFFSET; // 1001
export const CURVES = ["bin", "lin", "exp"];
export const ALL_CURVES = ["linear", ...CURVES];
export const DEFAULT_K = 0.7;
export const DEFAULT_STEPS = 20;

/** One update for remaining r >= 1, clamped so that a timestep never increases. */
function curveStep(s, r, k, curve, n, t, target) {
  const linear = s + (target - s) / r;
  let out;
  if (curve === "linear") {
    out = linear;
  } else if (curve === "bin") {
    // Parabola of fixed curvature c = -k T / N^2 through (0, s) and (r, target), at x = 1:
    // x0 = (c r^2 - (target - s)) / (2 c r), y0 = s - c x0^2, s' = c (1 - x0)^2 + y0,
    // which simplifies to the linear step + k T / N^2 (r - 1): no division by k, so k = 0 is
    // exactly the linear curve (the limit).
    out = linear + k * (t / (n * n)) * (r - 1);
  } else if (curve === "lin") {
    // Slow line from s (slope -(1-k) T/N), fast line ending at target at x = r (slope -(1+k) T/N).
    const slow = s - (1 - k) * (t / n);
    const fast = target + (1 + k) * (t / n) * (r - 1);
    out = Math.min(slow, fast);
  } else if (curve === "exp") {
    // b = -(1-k) T/N, lambda = 1/N: s' = s + b + (e^lambda - 1)(s - target + b r) / (1 - e^(lambda r)).
    const b = -(1 - k) * (t / n);
    const lam = 1 / n;
    out = s + b + (Math.expm1(lam) / -Math.expm1(lam * r)) * (s - target + b * r);
  } else {
    throw new Error(`unknown curve ${JSON.stringify(curve)}: expected one of ${ALL_CURVES.join(", ")}`);
  }
  return Math.min(out, s);
}

/**
 * Next timestep of a pixel following `curve` ("linear", "bin", "lin" or "exp") with priority k.
 * Mirrors asyndm.schedules.step(s, remaining, curve=, k=, num_steps=, num_train_timesteps=, target=).
 */
export function step(s, remaining, { curve, k = DEFAULT_K, numSteps, numTrainTimesteps = NUM_TRAIN_TIMESTEPS, target = OFFSET }) {
  if (!ALL_CURVES.includes(curve)) {
    throw new Error(`unknown curve ${JSON.stringify(curve)}: expected one of ${ALL_CURVES.join(", ")}`);
  }
  if (!Number.isInteger(numSteps) || numSteps < 1) throw new Error(`numSteps must be an integer >= 1, got ${numSteps}`);
  if (!Number.isInteger(remaining) || remaining < 0) throw new Error(`remaining must be an integer >= 0, got ${remaining}`);
  if (!(k >= 0 && k <= 1)) throw new Error(`k must lie in [0, 1], got ${k}`);
  if (remaining === 0) return 0;
  return curveStep(s, remaining, k, curve, numSteps, numTrainTimesteps, target);
}

/**
 * The timesteps one pixel sees over a whole run of numSteps steps: an array of numSteps + 1
 * values, values[i] = the timestep of the model call at step i (0-based), values[numSteps] = 0.
 * values[i] = step(values[i - 1], remaining = numSteps - i), starting from `start` (1001).
 * With curve "linear": 1001 - 1000 (i + 1) / N, then 0.
 */
export function track(curve, k, numSteps, { numTrainTimesteps = NUM_TRAIN_TIMESTEPS, offset = OFFSET, start } = {}) {
  const s0 = start ?? numTrainTimesteps + offset;
  const opts = { curve, k, numSteps, numTrainTimesteps, target: offset };
  const out = new Array(numSteps + 1);
  let s = s0;
  for (let i = 0; i <= numSteps; i++) {
    s = step(s, numSteps - i, opts);
    out[i] = s;
  }
  return out;
}

/** The background pixels' track: linear from 1001 (1001 - 1000 (i + 1) / N at step i, then 0). */
export function backgroundTrack(numSteps, options = {}) {
  return track("linear", 0, numSteps, options);
}

const NUMBER = /^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$/;

/**
 * Parse the key_words widget like asyndm.keywords.parse_key_words ("rabbit, basketball:0.9"),
 * but leniently, for a preview: returns { items: [{ word, k }], errors: [message] } and keeps
 * every item it can read.
 */
export function parseKeyWords(text, defaultK = DEFAULT_K) {
  const items = [];
  const errors = [];
  let parts = String(text ?? "").split(",");
  if (parts.length && !parts[parts.length - 1].trim()) parts = parts.slice(0, -1); // trailing comma
  for (const raw of parts) {
    let item = raw.trim();
    if (!item) {
      errors.push("empty key word: separate words with single commas");
      continue;
    }
    let k = defaultK;
    const colon = item.lastIndexOf(":");
    if (colon >= 0) {
      const value = item.slice(colon + 1).trim();
      const word = item.slice(0, colon).trim();
      if (!NUMBER.test(value)) {
        errors.push(`'${item}': the part after ':' must be a priority k in [0, 1]`);
        continue;
      }
      k = Number(value);
      if (!(k >= 0 && k <= 1)) {
        errors.push(`'${item}': k must lie in [0, 1]`);
        continue;
      }
      if (!word) {
        errors.push(`'${item}' has a priority but no word`);
        continue;
      }
      item = word;
    }
    items.push({ word: item, k });
  }
  return { items, errors };
}

/** A priority as the plots write it: at most two decimals ("0.7", "0.35", "1"). */
export function formatK(k) {
  return String(Math.round(Number(k) * 100) / 100);
}

function sameValues(a, b, tol) {
  if (a.length !== b.length) return false;
  for (let i = 0; i < a.length; i++) if (!(Math.abs(a[i] - b[i]) <= tol)) return false;
  return true;
}

/**
 * The legend text of curves drawn as one: the background first, then the items; one shared k is
 * written once ("rabbit, basketball k=0.7"), different ones per item ("a k=0.8, b k=0.9").
 */
export function groupLabel(members) {
  const items = members.filter((m) => !m.background);
  const names = members.map((m) => (m.background ? "background" : m.word ?? "key pixels"));
  if (!items.length) return names.join(", ");
  const ks = new Set(items.map((m) => formatK(m.k)));
  if (ks.size === 1) return `${names.join(", ")} k=${[...ks][0]}`;
  return members.map((m) => (m.background ? "background" : `${m.word ?? "key pixels"} k=${formatK(m.k)}`)).join(", ");
}

/**
 * Curves that lie on top of each other (every value within `tol` timesteps) become one series
 * whose label names all of them, so no curve hides another one silently. Input: series
 * { background?, word?, k?, values, ... } in drawing order; output: one series per distinct curve,
 * in the order of first appearance, with `members` (the merged inputs) and `label`.
 */
export function mergeCoinciding(series, tol = 1e-6) {
  const groups = [];
  for (const s of series) {
    const group = groups.find((g) => sameValues(g.values, s.values, tol));
    if (group) group.members.push(s);
    else groups.push({ values: s.values, members: [s] });
  }
  return groups.map((g) => ({
    ...g.members[0],
    background: g.members.some((m) => m.background),
    label: groupLabel(g.members),
    members: g.members.map((m) => ({ background: !!m.background, word: m.word ?? null, k: m.k ?? 0 })),
  }));
}
