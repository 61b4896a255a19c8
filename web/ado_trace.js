// ADO (Adaptive Diffusion Optimizer): draws what a run did on the node that sampled.
//
// Data arrive two ways, both as the payload of nodes/trace_view.py::chart_payload:
//  * "ADO Adaptive KSampler" returns it in its `ui` output (message.ado_trace[0] in onExecuted);
//  * the "ado_adaptive" sampler (KSampler dropdown, SamplerCustom with "ADO Adaptive Sampler") sends an
//    "ado.trace" websocket message addressed to the sampling node.
// The chart: noise level σ of every model call (log scale) against the planned grid, rejected calls,
// the per-call error estimate (1 = at tolerance), the quality monitor's estimated remaining RMSE (the run's
// quality curve, with the quality target if any) and the NFE used against the budget.
// The node's right-click menu offers "Copy ADO trace (JSON)" for sharing / replay.
// Drawn by a display-only canvas widget that is never serialised, so saved workflows never change.
// Self-contained: no downloads.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const CHART_H = 156;
const CHART_WIDGET = "ado_chart";
const PAD = 8;
const COLORS = {
  bg: "rgba(0,0,0,0.25)", grid: "rgba(255,255,255,0.10)", text: "#ddd", dim: "#999",
  planned: "#8a8a8a", taken: "#4fa3ff", rejected: "#ff5a5a", error: "#ffb347", tol: "rgba(255,179,71,0.6)",
  nfe: "#5fd35f", budget: "rgba(255,255,255,0.18)", quality: "#c58cff",
};

function log10(v) {
  return Math.log(v) / Math.LN10;
}

function fmt(v) {
  if (v == null) return "–";
  if (v === 0) return "0";
  return v >= 100 ? v.toFixed(0) : v >= 1 ? v.toFixed(2) : v.toPrecision(2);
}

function drawChart(node, ctx, y0, width) {
  const d = node.__adoTrace;
  if (node.flags?.collapsed) return;
  const w = width - 2 * PAD;
  if (!d || d.version !== 1) {  // running again: the last chart is gone, the new one comes at the end
    ctx.save();
    ctx.font = "11px sans-serif";
    ctx.fillStyle = COLORS.dim;
    ctx.textBaseline = "top";
    ctx.fillText("ADO: sampling…", PAD + 6, y0 + 4);
    ctx.restore();
    return;
  }
  ctx.save();
  ctx.fillStyle = COLORS.bg;
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(PAD, y0, w, CHART_H - PAD, 4);
  else ctx.rect(PAD, y0, w, CHART_H - PAD);
  ctx.fill();

  // header: NFE used vs budget, as text and a bar
  ctx.font = "11px sans-serif";
  ctx.textBaseline = "top";
  ctx.fillStyle = COLORS.text;
  const batch = d.batch > 1 ? `  ·  image ${d.sample + 1}/${d.batch}` : "";
  ctx.fillText(`ADO ${d.mode} · ${d.model_type}  NFE ${d.nfe}/${d.nfe_budget}` +
               (d.rejected ? `  ·  ${d.rejected} rejected` : "") + batch, PAD + 6, y0 + 4);
  const barY = y0 + 19, barW = w - 12;
  ctx.fillStyle = COLORS.budget;
  ctx.fillRect(PAD + 6, barY, barW, 4);
  ctx.fillStyle = COLORS.nfe;
  ctx.fillRect(PAD + 6, barY, barW * Math.min(1, d.nfe / Math.max(1, d.nfe_budget)), 4);

  // σ panel: x = model call (planned index for the grid), y = log σ
  const px = PAD + 34, pw = w - 40, py = y0 + 30, ph = 72;
  const calls = d.calls || [];
  const planned = (d.planned || []).filter((s) => s != null && s > 0);
  const sig = calls.map((c) => c.sigma).filter((s) => s != null && s > 0).concat(planned);
  if (sig.length) {
    const hi = log10(Math.max(...sig)), lo = log10(Math.min(...sig));
    const span = Math.max(hi - lo, 1e-6);
    const n = Math.max(calls.length, planned.length, 2);
    const X = (i) => px + (pw * i) / (n - 1);
    const Y = (s) => py + ph * (hi - log10(s)) / span;
    ctx.strokeStyle = COLORS.grid;
    ctx.lineWidth = 1;
    for (const frac of [0, 0.5, 1]) {
      ctx.beginPath();
      ctx.moveTo(px, py + ph * frac);
      ctx.lineTo(px + pw, py + ph * frac);
      ctx.stroke();
    }
    ctx.fillStyle = COLORS.dim;
    ctx.textBaseline = "middle";
    ctx.textAlign = "right";
    ctx.fillText(fmt(Math.pow(10, hi)), px - 4, py);
    ctx.fillText(fmt(Math.pow(10, lo)), px - 4, py + ph);
    ctx.fillText("σ", px - 4, py + ph / 2);
    ctx.textAlign = "left";
    // planned grid: grey squares
    ctx.fillStyle = COLORS.planned;
    planned.forEach((s, i) => ctx.fillRect(X(i) - 2, Y(s) - 2, 4, 4));
    // taken: blue line through accepted calls, red crosses for rejected ones
    ctx.strokeStyle = COLORS.taken;
    ctx.lineWidth = 2;
    ctx.beginPath();
    let started = false;
    calls.forEach((c, i) => {
      if (!c.accepted || c.sigma == null || c.sigma <= 0) return;
      if (started) ctx.lineTo(X(i), Y(c.sigma));
      else ctx.moveTo(X(i), Y(c.sigma));
      started = true;
    });
    ctx.stroke();
    calls.forEach((c, i) => {
      if (c.sigma == null || c.sigma <= 0) return;
      if (c.accepted) {
        ctx.fillStyle = COLORS.taken;
        ctx.beginPath();
        ctx.arc(X(i), Y(c.sigma), 2.5, 0, 2 * Math.PI);
        ctx.fill();
      } else {
        ctx.strokeStyle = COLORS.rejected;
        ctx.lineWidth = 1.5;
        const x = X(i), y = Y(c.sigma);
        ctx.beginPath();
        ctx.moveTo(x - 3, y - 3); ctx.lineTo(x + 3, y + 3);
        ctx.moveTo(x + 3, y - 3); ctx.lineTo(x - 3, y + 3);
        ctx.stroke();
      }
    });

    // legend
    ctx.textAlign = "right";
    ctx.textBaseline = "top";
    ctx.fillStyle = COLORS.taken;
    ctx.fillText("● σ taken", px + pw, py + 2);
    ctx.fillStyle = COLORS.planned;
    ctx.fillText("■ planned", px + pw, py + 14);
    if (d.rejected) {
      ctx.fillStyle = COLORS.rejected;
      ctx.fillText("× rejected", px + pw, py + 26);
    }
    ctx.textBaseline = "middle";

    // error panel: one bar per call on a log scale that always shows the tolerance (1, dashed)
    const errs = calls.map((c) => c.error).filter((e) => e != null && e > 0);
    const ey = py + ph + 8, eh = 28;
    const eHi = Math.ceil(log10(Math.max(1, ...errs)) + 0.01), eLo = Math.floor(log10(Math.min(0.1, ...errs)));
    const E = (e) => ey + eh * (eHi - Math.min(Math.max(log10(e), eLo), eHi)) / (eHi - eLo);
    ctx.strokeStyle = COLORS.tol;
    ctx.setLineDash([3, 3]);
    ctx.beginPath();
    ctx.moveTo(px, E(1));
    ctx.lineTo(px + pw, E(1));
    ctx.stroke();
    ctx.setLineDash([]);
    ctx.fillStyle = COLORS.dim;
    ctx.textAlign = "right";
    ctx.fillText("err", px - 4, ey + eh - 4);
    ctx.fillStyle = COLORS.tol;
    ctx.fillText("tol", px - 4, Math.max(E(1), ey + 4));
    ctx.textAlign = "left";
    const bw = Math.max(2, Math.min(8, pw / n - 2));
    calls.forEach((c, i) => {
      if (c.error == null || !(c.error > 0)) return;
      ctx.fillStyle = c.accepted ? COLORS.error : COLORS.rejected;
      const top = E(c.error);
      ctx.fillRect(X(i) - bw / 2, top, bw, ey + eh - top);
    });
    drawQualityCurve(ctx, calls, d.quality_target, X, px, pw, ey, eh);
  }
  ctx.restore();
}

// Quality monitor: the estimated remaining RMSE per call as a line over the error panel, on its own log
// scale (labelled on the right), with the quality target dashed.  Nothing is drawn without a monitor.
function drawQualityCurve(ctx, calls, target, X, px, pw, ey, eh) {
  const pts = calls.map((c, i) => [i, c.remaining_error]).filter(([, v]) => v != null && v > 0);
  if (!pts.length) return;
  const vals = pts.map(([, v]) => v).concat(target > 0 ? [target] : []);
  const hi = Math.ceil(log10(Math.max(...vals)) + 0.01), lo = Math.floor(log10(Math.min(...vals)));
  const Q = (v) => ey + eh * (hi - log10(v)) / Math.max(hi - lo, 1e-6);
  ctx.strokeStyle = COLORS.quality;
  ctx.lineWidth = 1.5;
  if (target > 0) {
    ctx.setLineDash([2, 3]);
    ctx.beginPath();
    ctx.moveTo(px, Q(target));
    ctx.lineTo(px + pw, Q(target));
    ctx.stroke();
    ctx.setLineDash([]);
  }
  ctx.beginPath();
  pts.forEach(([i, v], k) => (k ? ctx.lineTo(X(i), Q(v)) : ctx.moveTo(X(i), Q(v))));
  ctx.stroke();
  ctx.fillStyle = COLORS.quality;
  ctx.textAlign = "right";
  ctx.textBaseline = "top";
  ctx.fillText(`est. RMSE ${fmt(pts[pts.length - 1][1])}` + (target > 0 ? ` (target ${fmt(target)})` : ""),
               px + pw, ey - 11);
  ctx.textAlign = "left";
}

// The chart is a display-only widget after the node's own widgets (so ComfyUI draws latent previews below
// it). It is never serialised: not into widgets_values (saved workflows keep their layout, and it is last
// anyway) nor into the API prompt.
function chartWidget(node) {
  let widget = node.widgets?.find((w) => w.name === CHART_WIDGET);
  if (widget) return placeBeforePreviews(node, widget);
  widget = {
    name: CHART_WIDGET, type: "ado_chart", value: null, serialize: false, options: { serialize: false },
    computeSize: (width) => [width, CHART_H],
    draw(ctx, n, widgetWidth, y) {
      try {
        drawChart(n, ctx, y, widgetWidth);
      } catch (e) {
        console.warn("ADO: chart drawing failed", e);
      }
    },
  };
  if (node.addCustomWidget) node.addCustomWidget(widget);
  else (node.widgets ??= []).push(widget);
  return placeBeforePreviews(node, widget);
}

// ComfyUI shows latent previews in a widget ("$$canvas-image-preview") that fills the rest of the node:
// keep the chart above it so neither hides the other.
function placeBeforePreviews(node, widget) {
  const widgets = node.widgets;
  const preview = widgets.findIndex((w) => typeof w.name === "string" && w.name.startsWith("$$"));
  const own = widgets.indexOf(widget);
  if (preview >= 0 && preview < own) {
    widgets.splice(own, 1);
    widgets.splice(preview, 0, widget);
  }
  return widget;
}

function copyText(text) {
  const fallback = () => {
    const area = document.createElement("textarea");
    area.value = text;
    document.body.appendChild(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  };
  if (navigator.clipboard?.writeText) navigator.clipboard.writeText(text).catch(fallback);
  else fallback();
}

// Right-click menu entry: copy the full trace as JSON (paste it into "ADO Trace to Sigmas" to replay).
function addMenu(node) {
  if (node.__adoMenu) return;
  node.__adoMenu = true;
  const orig = node.getExtraMenuOptions;
  node.getExtraMenuOptions = function (canvas, options) {
    const r = orig?.apply(this, arguments);
    if (this.__adoTraceJson) {
      options.push({ content: "Copy ADO trace (JSON)", callback: () => copyText(this.__adoTraceJson) });
    }
    return r;
  };
}

function showTrace(node, payload, json) {
  if (!node || !payload) return;
  node.__adoTrace = payload;
  node.__adoTraceJson = json ?? null;
  addMenu(node);
  chartWidget(node);
  const min = node.computeSize();
  node.setSize([Math.max(node.size[0], min[0], 280), Math.max(node.size[1], min[1])]);
  node.setDirtyCanvas?.(true, true);
  app.graph?.setDirtyCanvas?.(true, true);
}

// A node that starts executing drops its previous chart: a KSampler switched to another sampler must not
// keep showing an old ADO run.  The ADO KSampler keeps the (empty) chart area until its result arrives.
function clearTrace(node) {
  if (!node || !node.__adoTrace) return;
  node.__adoTrace = null;
  node.__adoTraceJson = null;
  if (node.type !== "ADOAdaptiveKSampler" && node.widgets) {
    const i = node.widgets.findIndex((w) => w.name === CHART_WIDGET);
    if (i >= 0) node.widgets.splice(i, 1);
    node.setSize([node.size[0], node.computeSize()[1]]);
  }
  node.setDirtyCanvas?.(true, true);
}

function findNode(id) {
  const graph = app.graph;
  if (!graph || id == null) return null;
  return graph.getNodeById(Number(id)) ?? graph.getNodeById(id);
}

// ComfyUI may serve web/ twice (WEB_DIRECTORY and pyproject's [tool.comfy] web, under two URLs): register once.
if (!globalThis.__adoTraceChartRegistered) {
  globalThis.__adoTraceChartRegistered = true;
  app.registerExtension({
    name: "ado.traceChart",
    async setup() {
      api.addEventListener("ado.trace", (event) => {
        const { node, trace, trace_json } = event.detail || {};
        showTrace(findNode(node), trace, trace_json);
      });
      api.addEventListener("executing", (event) => {
        const d = event.detail;
        clearTrace(findNode(d !== null && typeof d === "object" ? d.node ?? d.display_node : d));
      });
    },
    async beforeRegisterNodeDef(nodeType, nodeData) {
      if (nodeData?.name !== "ADOAdaptiveKSampler") return;
      const onExecuted = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (message) {
        const r = onExecuted?.apply(this, arguments);
        const payload = message?.ado_trace?.[0];
        if (payload) showTrace(this, payload, message?.ado_trace_json?.[0]);
        return r;
      };
    },
  });
}
