// raygrpo dashboard: fetches the JSON API and draws plain SVG charts. No libraries, no CDN (works offline).
"use strict";
const Dashboard = (() => {
  const SVG = "http://www.w3.org/2000/svg";
  const COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22", "#7f7f7f"];
  const REFRESH_MS = 5000;

  async function api(url) {
    const response = await fetch(url, { cache: "no-store" });
    if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
    return response.json();
  }

  function fmt(value) {
    if (value === null || value === undefined || !isFinite(value)) return "–";
    const a = Math.abs(value);
    if (a !== 0 && (a < 1e-3 || a >= 1e5)) return value.toExponential(2);
    return value.toFixed(a >= 100 ? 1 : a >= 1 ? 3 : 4);
  }

  function when(seconds) {
    return seconds ? new Date(seconds * 1000).toLocaleString() : "–";
  }

  function el(tag, attrs = {}, text = null) {
    const node = tag.startsWith("svg:") ? document.createElementNS(SVG, tag.slice(4)) : document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== null) node.textContent = text;
    return node;
  }

  // Round tick values covering [lo, hi], each with a label of just enough decimals for the tick spacing.
  function ticks(lo, hi, count) {
    if (lo === hi) { lo -= 1; hi += 1; }
    const raw = (hi - lo) / count;
    const exp = Math.floor(Math.log10(raw));
    const mag = Math.pow(10, exp);
    const mult = [1, 2, 2.5, 5, 10].find((m) => m * mag >= raw);
    const step = mult * mag;
    const decimals = Math.max(0, -exp + (mult === 2.5 ? 1 : 0) - (mult === 10 ? 1 : 0));
    const big = Math.max(Math.abs(lo), Math.abs(hi)) >= 1e5 || (step < 1e-4);
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
      const t = Math.abs(v) < step * 1e-9 ? 0 : v;
      out.push({ value: t, label: big ? t.toExponential(1) : t.toFixed(decimals) });
    }
    return out;
  }

  // series: [{name, values, color, band: [lo[], hi[]] | null, width}] aligned with steps; null values break the line.
  function lineChart(steps, series, { width = 640, height = 260, compact = false } = {}) {
    const m = compact ? { l: 46, r: 8, t: 6, b: 20 } : { l: 56, r: 12, t: 10, b: 30 };
    const svg = el("svg:svg", { viewBox: `0 0 ${width} ${height}`, class: "chart", role: "img" });
    const ys = [];
    for (const s of series) {
      s.values.forEach((v) => v !== null && ys.push(v));
      if (s.band) s.band.flat().forEach((v) => v !== null && ys.push(v));
    }
    if (!steps.length || !ys.length) {
      svg.append(el("svg:text", { x: width / 2, y: height / 2, "text-anchor": "middle" }, "no finite values yet"));
      return svg;
    }
    let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
    if (y0 === y1) { y0 -= Math.abs(y0) * 0.1 || 1; y1 += Math.abs(y1) * 0.1 || 1; }
    const pad = (y1 - y0) * 0.05;
    y0 -= pad; y1 += pad;
    let [x0, x1] = [Math.min(...steps), Math.max(...steps)];
    if (x0 === x1) { x0 -= 1; x1 += 1; }
    const X = (s) => m.l + ((s - x0) / (x1 - x0)) * (width - m.l - m.r);
    const Y = (v) => height - m.b - ((v - y0) / (y1 - y0)) * (height - m.t - m.b);
    for (const { value, label } of ticks(y0, y1, compact ? 4 : 5)) {
      svg.append(el("svg:line", { x1: m.l, x2: width - m.r, y1: Y(value), y2: Y(value), class: "grid" }));
      svg.append(el("svg:text", { x: m.l - 5, y: Y(value) + 4, "text-anchor": "end" }, label));
    }
    for (const { value } of ticks(x0, x1, compact ? 3 : 6).filter((t) => Number.isInteger(t.value))) {  // steps are whole numbers
      svg.append(el("svg:text", { x: X(value), y: height - m.b + 14, "text-anchor": "middle" }, String(value)));
    }
    svg.append(el("svg:line", { x1: m.l, x2: m.l, y1: m.t, y2: height - m.b, class: "axis" }));
    svg.append(el("svg:line", { x1: m.l, x2: width - m.r, y1: height - m.b, y2: height - m.b, class: "axis" }));
    if (!compact) svg.append(el("svg:text", { x: width - m.r, y: height - 2, "text-anchor": "end" }, "step"));
    for (const s of series) {
      if (s.band) {
        const [lo, hi] = s.band;
        const idx = steps.map((_, i) => i).filter((i) => lo[i] !== null && hi[i] !== null);
        if (idx.length > 1) {
          const d = idx.map((i, k) => `${k ? "L" : "M"}${X(steps[i])},${Y(hi[i])}`).join("") +
            idx.slice().reverse().map((i) => `L${X(steps[i])},${Y(lo[i])}`).join("") + "Z";
          svg.append(el("svg:path", { d, fill: s.color, "fill-opacity": 0.15, stroke: "none" }));
        }
      }
      let d = "";
      let pen = false;
      s.values.forEach((v, i) => {
        if (v === null) { pen = false; return; }
        d += `${pen ? "L" : "M"}${X(steps[i]).toFixed(1)},${Y(v).toFixed(1)}`;
        pen = true;
      });
      const path = el("svg:path", { d, class: "series", stroke: s.color, "stroke-width": s.width || 1.8, "data-name": s.name });
      path.append(el("svg:title", {}, s.name));
      svg.append(path);
      s.values.forEach((v, i) => {  // a point with no neighbour draws no line segment: show it as a dot
        const alone = v !== null && (i === 0 || s.values[i - 1] === null) && (i === s.values.length - 1 || s.values[i + 1] === null);
        if (alone) svg.append(el("svg:circle", { cx: X(steps[i]), cy: Y(v), r: 3, fill: s.color }));
      });
    }
    return svg;
  }

  function legend(series) {
    const box = el("div", { class: "legend" });
    for (const s of series) {
      const item = el("span", {}, s.name);
      item.style.setProperty("--c", s.color);
      box.append(item);
    }
    return box;
  }

  function draw(container, steps, series, options) {
    container.replaceChildren(lineChart(steps, series, options), ...(options && options.compact ? [] : [legend(series)]));
  }

  // One chart per reward (each on its own scale: JPEG kB and a CLIP cosine do not share an axis), the weighted total first.
  function drawRewards(container, metrics) {
    const names = Object.keys(metrics.series).map((k) => /^reward\/(.+)\/mean$/.exec(k)).filter(Boolean).map((x) => x[1]);
    names.sort((a, b) => (b === "total") - (a === "total") || a.localeCompare(b));
    const cells = names.map((name, i) => {
      const mean = metrics.series[`reward/${name}/mean`];
      const std = metrics.series[`reward/${name}/std`];
      const band = std ? [mean.map((v, j) => (v === null || std[j] === null ? null : v - std[j])), mean.map((v, j) => (v === null || std[j] === null ? null : v + std[j]))] : null;
      const color = name === "total" ? "#000" : COLORS[(i - 1 + COLORS.length) % COLORS.length];
      const cell = el("div", { "data-reward": name });
      const last = mean.filter((v) => v !== null).pop();
      cell.append(el("h3", {}, `${name === "total" ? "total (weighted)" : name}  ${last === undefined ? "" : "· last " + fmt(last)}`));
      cell.append(lineChart(metrics.steps, [{ name, values: mean, band, color, width: 2 }], { width: 420, height: 190, compact: true }));
      return cell;
    });
    container.replaceChildren(...(cells.length ? cells : [el("p", { class: "muted" }, "no reward metrics yet")]));
  }

  function prefixed(metrics, prefix) {
    return Object.keys(metrics.series).filter((k) => k.startsWith(prefix)).sort()
      .map((k, i) => ({ name: k.slice(prefix.length), values: metrics.series[k], color: COLORS[i % COLORS.length] }));
  }

  function drawLearner(container, metrics) {
    const cells = prefixed(metrics, "learner/").filter((s) => s.name !== "policy_version").map((s) => {
      const cell = el("div");
      cell.append(el("h3", {}, s.name), lineChart(metrics.steps, [{ ...s, color: COLORS[0] }], { width: 300, height: 130, compact: true }));
      return cell;
    });
    container.replaceChildren(...(cells.length ? cells : [el("p", { class: "muted" }, "no learner metrics yet")]));
  }

  // One chart per reward: mean, std, min and max of the trained members' advantages; then the groups whose rewards were all equal.
  function drawAdvantages(container, metrics) {
    const names = Object.keys(metrics.series).map((k) => /^advantage\/(.+)\/mean$/.exec(k)).filter(Boolean).map((x) => x[1]).sort();
    const cells = names.map((name) => {
      const series = ["mean", "std", "min", "max"].filter((stat) => metrics.series[`advantage/${name}/${stat}`])
        .map((stat, i) => ({ name: stat, values: metrics.series[`advantage/${name}/${stat}`], color: COLORS[i % COLORS.length] }));
      const cell = el("div", { "data-advantage": name });
      cell.append(el("h3", {}, name), lineChart(metrics.steps, series, { width: 300, height: 130, compact: true }), legend(series));
      return cell;
    });
    const zero = metrics.series["groups/zero_std"];
    if (cells.length && zero) {
      const cell = el("div");
      cell.append(el("h3", {}, "groups with equal rewards"), lineChart(metrics.steps, [{ name: "zero_std", values: zero, color: COLORS[0] }], { width: 300, height: 130, compact: true }));
      cells.push(cell);
    }
    container.replaceChildren(...(cells.length ? cells : [el("p", { class: "muted" }, "no advantage statistics yet")]));
  }

  // One chart per reward (samples without a score, retried requests, failed requests), then the groups dropped
  // and trained: a reward server that is down or rejects its token shows here before the run stops.
  function drawFailures(container, metrics) {
    const names = Object.keys(metrics.series).map((k) => /^rewards\/(.+)\/missing$/.exec(k)).filter(Boolean).map((x) => x[1]).sort();
    const cells = names.map((name) => {
      const series = ["missing", "retries", "errors"].filter((what) => metrics.series[`rewards/${name}/${what}`])
        .map((what, i) => ({ name: what, values: metrics.series[`rewards/${name}/${what}`], color: COLORS[i % COLORS.length] }));
      const cell = el("div", { "data-failures": name });
      cell.append(el("h3", {}, name), lineChart(metrics.steps, series, { width: 300, height: 130, compact: true }), legend(series));
      return cell;
    });
    const groups = ["dropped", "trained"].filter((what) => metrics.series[`groups/${what}`])
      .map((what, i) => ({ name: what, values: metrics.series[`groups/${what}`], color: COLORS[(i + 3) % COLORS.length] }));
    if (groups.length) {
      const cell = el("div", { "data-failures": "groups" });
      cell.append(el("h3", {}, "groups"), lineChart(metrics.steps, groups, { width: 300, height: 130, compact: true }), legend(groups));
      cells.push(cell);
    }
    container.replaceChildren(...(cells.length ? cells : [el("p", { class: "muted" }, "no reward failure counts yet")]));
  }

  // The guard's signals exist at guard rounds only: one chart per signal over those rounds (rewards, gold rewards,
  // diversity), then its actions (warn, rollback, stop) with their evidence. Hidden for runs without a guard.
  function drawGuard(panel, metrics, guard) {
    const keys = Object.keys(metrics.series).filter((k) => /^guard\/(reward|gold|diversity)\//.test(k)).sort();
    panel.hidden = !keys.length;
    if (!keys.length) return false;
    const rounds = metrics.steps.map((_, i) => i).filter((i) => keys.some((k) => metrics.series[k][i] !== null));
    const steps = rounds.map((i) => metrics.steps[i]);
    const cells = keys.map((key, n) => {
      const cell = el("div", { "data-guard": key.slice(6) });
      const values = rounds.map((i) => metrics.series[key][i]);
      cell.append(el("h3", {}, key.slice(6)), lineChart(steps, [{ name: key, values, color: COLORS[n % COLORS.length] }], { width: 300, height: 130, compact: true }));
      return cell;
    });
    document.getElementById("chart-guard").replaceChildren(...cells);
    const items = guard.events.map((e) => el("li", { class: `guard-${e.action}` }, `step ${e.step}: ${e.action}: ${e.message}`));
    document.getElementById("guard-events").replaceChildren(...(items.length ? items : [el("li", { class: "muted" }, "no rule fired")]));
    return true;
  }

  // A prompt may be very long (100k characters): headings and tooltips show its start.
  function shortPrompt(prompt) {
    return prompt.length > 300 ? `${prompt.slice(0, 300)}…` : prompt;
  }

  // ----- gallery -----

  function drawGallery(container, gallery) {
    const groups = gallery.groups.map((group) => {
      const section = el("div", { class: "group" });
      section.append(el("h3", {}, `group ${group.group_id} · policy v${group.policy_version} · “${shortPrompt(group.prompt)}”`));
      const totals = group.samples.map((s) => s.total).filter((t) => t !== null);
      const [best, worst] = [Math.max(...totals), Math.min(...totals)];
      const row = el("div", { class: "samples" });
      for (const s of group.samples) {
        const mark = totals.length > 1 && best !== worst ? (s.total === best ? "best" : s.total === worst ? "worst" : "") : "";
        const figure = el("figure", { class: mark });
        const img = el("img", { src: s.url, alt: `group ${group.group_id} sample ${s.member}`, class: "sample", title: shortPrompt(group.prompt) });
        const caption = el("figcaption");
        caption.append(el("b", {}, `total ${fmt(s.total)}`));
        for (const [name, v] of Object.entries(s.scores)) caption.append(el("br"), document.createTextNode(`${name} ${fmt(v)}`));
        figure.append(img, caption);
        row.append(figure);
      }
      section.append(row);
      return section;
    });
    container.replaceChildren(...(groups.length ? groups : [el("p", { class: "muted" }, "this step's gallery is empty")]));
  }

  // ----- pages -----

  async function indexPage() {
    const body = document.querySelector("#runs tbody");
    async function refresh() {
      const data = await api("/api/runs");
      document.getElementById("root").textContent = data.root;
      document.getElementById("empty").hidden = data.runs.length > 0;
      body.replaceChildren(...data.runs.map((r) => {
        const tr = el("tr");
        const link = el("a", { href: `/runs/${encodeURIComponent(r.name)}` }, r.name);
        const status = el("span", { class: `status ${r.status}`, title: r.status_reason }, r.status);
        const cells = [link, when(r.started_at), String(r.steps), fmt(r.last_reward), status];
        cells.forEach((c, i) => { const td = el("td", i === 2 || i === 3 ? { class: "num" } : {}); td.append(c); tr.append(td); });
        return tr;
      }));
    }
    await refresh();
    setInterval(() => refresh().catch(console.error), REFRESH_MS);
  }

  async function runPage() {
    const name = decodeURIComponent(location.pathname.split("/")[2]);
    document.title = `${name} · raygrpo`;
    document.getElementById("name").textContent = name;
    const select = document.getElementById("gallery-step");
    let shownStep = null;   // the gallery on screen
    let followLatest = true; // until the user picks a step, show the newest gallery as it appears
    select.addEventListener("change", () => {
      followLatest = select.selectedIndex === 0;
      showGallery(Number(select.value)).catch(console.error);
    });

    async function showGallery(step) {
      const gallery = await api(`/api/runs/${encodeURIComponent(name)}/samples/${step}`);
      drawGallery(document.getElementById("gallery"), gallery);
      document.getElementById("gallery-note").textContent = `written ${when(gallery.written_at)}`;
      shownStep = step;
    }

    async function showGuardGallery(step) {
      const gallery = await api(`/api/runs/${encodeURIComponent(name)}/guard/samples/${step}`);
      drawGallery(document.getElementById("guard-gallery"), gallery);
    }

    async function refresh() {
      const [info, metrics] = await Promise.all([api(`/api/runs/${encodeURIComponent(name)}`), api(`/api/runs/${encodeURIComponent(name)}/metrics`)]);
      const status = document.getElementById("status");
      status.textContent = info.status;
      status.className = `status ${info.status}`;
      status.title = info.status_reason;
      document.getElementById("summary").textContent =
        `started ${when(info.started_at)} · ${info.steps} steps · last reward ${fmt(info.last_reward)} · ${info.status_reason}`;
      drawRewards(document.getElementById("chart-rewards"), metrics);
      draw(document.getElementById("chart-timings"), metrics.steps, prefixed(metrics, "time/"), { width: 900, height: 220 });
      drawFailures(document.getElementById("chart-failures"), metrics);
      drawLearner(document.getElementById("chart-learner"), metrics);
      drawAdvantages(document.getElementById("chart-advantages"), metrics);
      const guard = await api(`/api/runs/${encodeURIComponent(name)}/guard`);
      if (drawGuard(document.getElementById("guard-panel"), metrics, guard)) {
        const guardSelect = document.getElementById("guard-step");
        const rounds = guard.steps.slice().reverse();  // newest first
        if (guardSelect.options.length !== rounds.length) {
          guardSelect.replaceChildren(...rounds.map((s) => el("option", { value: s }, `step ${s}`)));
          guardSelect.onchange = () => showGuardGallery(Number(guardSelect.value)).catch(console.error);
          if (rounds.length) await showGuardGallery(rounds[0]);
        }
      }
      const steps = info.sample_steps.slice().reverse();  // newest first
      if (select.options.length !== steps.length) {
        const keep = select.value;
        select.replaceChildren(...steps.map((s) => el("option", { value: s }, `step ${s}`)));
        if (!followLatest && keep) select.value = keep;
      }
      select.hidden = !steps.length;
      if (!steps.length) {
        const note = el("p", { class: "muted" }, "no sample gallery yet (written every logging.sample_every steps)");
        // Runs from before galleries existed still have the first/last-step grid of their report.
        const grid = info.images.includes("samples.png") ? [el("img", { src: `/runs/${encodeURIComponent(name)}/files/samples.png`, class: "report", alt: "samples.png" })] : [];
        document.getElementById("gallery").replaceChildren(note, ...grid);
      } else if (followLatest && shownStep !== steps[0]) {
        select.value = steps[0];
        await showGallery(steps[0]);
      }
      return info.status === "running";
    }

    const running = await refresh();
    if (running) {
      const timer = setInterval(() => refresh().then((still) => still || clearInterval(timer)).catch(console.error), REFRESH_MS);
    }
  }

  return { indexPage, runPage, lineChart, ticks };
})();
