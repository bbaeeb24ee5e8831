// PyAgent fleet dashboard: the live topology, run traces and charts of one observer.
//
// Data: `GET /api/observability` (the snapshot, re-fetched every couple of seconds for figures),
// `GET /api/stream` (server-sent events read with fetch(), so the bearer token can be sent;
// resumed with Last-Event-ID), `GET /api/runs`, `/api/runs/{id}` and `/api/runs/{id}/lineage`.
// The graph is updated in place: node and link objects live as long as their node, new ones are
// added, figures and status are written into the existing objects, and redraws are coalesced.

const KINDS = ['run', 'step', 'agent', 'subagent', 'tool', 'backend'];
const KIND_COLOR = {
  run: '#e2e8f0', step: '#60a5fa', agent: '#34d399', subagent: '#a3e635', tool: '#f472b6',
  backend: '#a78bfa',
};
const STATUS_RING = { running: '#22d3ee', error: '#ef4444', interrupted: '#f59e0b' };
const EDGE_COLOR = {
  contains: '#4a5568', next: '#5b6b8c', delegates: '#3f7cc4', calls: '#b0628f', uses: '#7a66c9',
};
const FLASH_COLOR = '#67e8f9';
const SELECTED_COLOR = '#ffffff';
const CLOSED = { end: 'ok', error: 'error', interrupted: 'interrupted' };
const NODE_KIND = { run: 'run', step: 'step', agent: 'agent', tool: 'tool', backend: 'backend' };
const EDGE_KIND = { step: 'contains', agent: 'delegates', tool_call: 'calls', llm_call: 'uses' };
const LABEL_ATTR = {
  step: 'pyagent.step.id', agent: 'gen_ai.agent.name', tool_call: 'gen_ai.tool.name',
  llm_call: 'gen_ai.request.model',
};

const FLUSH_MS = 250; // graph and list updates: at most four a second
const SNAPSHOT_MS = 2000; // figures: a fresh snapshot at most this often (longer when it is big)
const SNAPSHOT_STALE_MS = 10000; // and at least this often while the page is open
const TRACE_MS = 2000;
const RUNS_MS = 10000;
const IDLE_MS = 3000; // the graph stops drawing this long after the last change
const FRAME_MS = 50; // at most 20 frames a second unless the pointer is on the graph
const INPUT_MS = 1500; // the display's rate for this long after pointer input
const FLASH_MS = 1500;
const SILENCE_MS = 10000; // a stream that says nothing this long (metrics come every second) is dead
const LIST_LIMIT = 250;
const WATERFALL_LIMIT = 3000;
const SERIES_MAX = 600;
const LATENCY_MAX = 100000;
const SPAN_MAX = 50000;
const REL_3D = 3;
const REL_2D = 3;

// ---------------------------------------------------------------------------------------------
// state

const S = {
  token: null,
  filter: { run: '', agent: '', window: '' },
  filterGen: 0,
  sizeBy: 'tokens',
  nodes: new Map(), // id -> node object (the very objects the graph holds)
  links: new Map(), // "source\u0001target" -> link object
  spans: new Map(), // open span id -> {node, agent}
  lastStep: new Map(), // run -> its latest step node
  definitions: new Map(), // run -> agent name -> definition
  knownRuns: new Set(),
  lastEventId: null, // the last stream event applied (resume point)
  snapshotCursor: -1, // the event id the last snapshot included
  sourceCursor: 0, // the newest event id the observer has read (from metrics events)
  selected: null,
  hovered: null,
  traceRun: null,
  tracePinned: false,
  traceSpan: null,
  traceDetail: null,
  collapsed: new Set(),
  series: [],
  runs: [],
  dirty: { structure: false, nodes: false, links: false, list: false },
  pendingLatency: [],
  pendingParticles: new Set(),
  flashing: new Set(),
  flushTimer: null,
  lastFlush: 0,
  graph: null,
  mode: null,
  banners: new Map(),
  running: 0, // nodes running now (their rings pulse)
  now: Date.now(), // the wall clock of the last update, for flashes
  // rendering (see loop)
  lastActivity: 0,
  lastRender: 0,
  renderCost: 0,
  frameMs: 0,
  continuous: false,
  inputUntil: 0,
  engineRunning: false,
  laidOut: false,
  forceSize: null,
  interacted: false, // the user moved the camera: stop framing the graph for them
};

const $ = (id) => document.getElementById(id);

const dashboard = {
  ready: false,
  mode: null,
  latencies: [],
  edgesLit: 0,
  nodeIds: () => (S.graph ? S.graph.data().nodes.map((n) => n.id) : []),
  select: (id) => select(id),
  nodeScreenPosition: (id) => nodeScreenPosition(id),
  get hovered() { return S.hovered; },
  get selected() { return S.selected; },
  get traceRun() { return S.traceRun; },
  series: () => S.series.map((p) => ({ ...p })),
};
window.pyagentDashboard = dashboard;

// ---------------------------------------------------------------------------------------------
// formatting

const escMap = { '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' };
function esc(value) {
  return String(value ?? '').replace(/[&<>"']/g, (c) => escMap[c]);
}
const intFormat = new Intl.NumberFormat('en-US', { maximumFractionDigits: 0 });
function fmtInt(v) {
  return v == null ? '—' : intFormat.format(Math.round(v));
}
function fmtCompact(v) {
  if (v == null) return '—';
  const a = Math.abs(v);
  if (a >= 1e9) return (v / 1e9).toFixed(a >= 1e10 ? 0 : 1) + 'G';
  if (a >= 1e6) return (v / 1e6).toFixed(a >= 1e7 ? 0 : 1) + 'M';
  if (a >= 1e4) return (v / 1e3).toFixed(a >= 1e5 ? 0 : 1) + 'k';
  return intFormat.format(Math.round(v));
}
function fmtNum(v, digits = 1) {
  return v == null ? '—' : Number(v).toFixed(digits);
}
function fmtCost(v) {
  if (v == null) return 'unknown';
  if (v === 0) return '$0';
  if (Math.abs(v) < 0.01) return '$' + v.toFixed(6);
  return '$' + v.toFixed(v < 10 ? 4 : 2);
}
function fmtBytes(v) {
  if (v == null) return '—';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let x = v;
  let i = 0;
  while (Math.abs(x) >= 1024 && i < units.length - 1) { x /= 1024; i += 1; }
  return (i === 0 ? String(Math.round(x)) : x.toFixed(x < 10 ? 2 : 1)) + ' ' + units[i];
}
function fmtDur(s) {
  if (s == null) return '—';
  if (s < 0.001) return (s * 1e6).toFixed(0) + ' µs';
  if (s < 1) return (s * 1000).toFixed(s < 0.01 ? 2 : 0) + ' ms';
  if (s < 120) return s.toFixed(2) + ' s';
  return (s / 60).toFixed(1) + ' min';
}
function fmtTime(t) {
  if (t == null) return '—';
  return new Date(t * 1000).toLocaleTimeString('en-GB', { hour12: false });
}
function fmtTokens(inp, out) {
  if (inp == null && out == null) return '—';
  return fmtCompact(inp || 0) + ' / ' + fmtCompact(out || 0);
}
function pill(status) {
  return `<span class="pill st-${esc(status)}">${esc(status)}</span>`;
}
function kindDot(kind) {
  return `<span class="dot" style="background:${KIND_COLOR[kind] || '#888'}"></span>`;
}

// ---------------------------------------------------------------------------------------------
// banner, connection

const BANNER_ORDER = ['auth', 'data', 'network', 'stream'];

function setBanner(key, level, html) {
  S.banners.set(key, { level, html });
  renderBanner();
}
function clearBanner(key) {
  if (S.banners.delete(key)) renderBanner();
}
function renderBanner() {
  const el = $('banner');
  const key = BANNER_ORDER.find((k) => S.banners.has(k));
  if (!key) {
    el.hidden = true;
    el.removeAttribute('data-kind');
    el.innerHTML = '';
    return;
  }
  const banner = S.banners.get(key);
  el.hidden = false;
  el.dataset.kind = key;
  el.className = 'banner lvl-' + banner.level;
  if (el.innerHTML !== banner.html) el.innerHTML = banner.html;
}

function setConn(state, text) {
  const el = $('conn');
  el.className = 'conn st-' + state;
  el.textContent = text;
}

function authBanner(message) {
  const hint = S.token
    ? 'The bearer token this tab holds was refused.'
    : 'This observer needs a bearer token.';
  setBanner('auth', 'error',
    `<strong>Unauthorized (401).</strong> ${hint} Open the dashboard with the token in the ` +
    `address fragment: <code>${esc(location.origin)}/#token=&lt;token&gt;</code> ` +
    '(it is kept for this browser tab only and never sent in a URL).' +
    (message ? ` <span class="muted">Server: ${esc(message)}</span>` : ''));
  setConn('unauthorized', 'unauthorized');
}

// ---------------------------------------------------------------------------------------------
// HTTP

class ApiError extends Error {
  constructor(kind, status, message) {
    super(message);
    this.kind = kind;
    this.status = status;
  }
}

function authHeaders(extra = {}) {
  const headers = { ...extra };
  if (S.token) headers.Authorization = 'Bearer ' + S.token;
  return headers;
}

async function api(path) {
  let res;
  try {
    res = await fetch(path, { headers: authHeaders({ Accept: 'application/json' }), cache: 'no-store' });
  } catch (err) {
    throw new ApiError('network', 0, err && err.message ? err.message : String(err));
  }
  if (res.ok) return res.json();
  let message = res.statusText || 'HTTP ' + res.status;
  try {
    const body = await res.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (_) { /* not JSON */ }
  const kind = res.status === 401 ? 'auth' : res.status === 503 ? 'unavailable' : 'http';
  throw new ApiError(kind, res.status, message);
}

// One place that turns a failed request into the banner that explains it.
function reportError(err, what) {
  if (!(err instanceof ApiError)) {
    setBanner('network', 'error', `<strong>Dashboard error</strong> while loading ${esc(what)}: ${esc(err && err.message)}`);
    return;
  }
  if (err.kind === 'auth') {
    authBanner(err.message);
  } else if (err.kind === 'unavailable') {
    dataBanner(err.message, false);
  } else if (err.kind === 'network') {
    setBanner('network', 'error',
      `<strong>Cannot reach the observer</strong> at <code>${esc(location.origin)}</code> ` +
      `(${esc(err.message)}). <span class="muted">Retrying…</span>`);
  } else {
    setBanner('network', 'warn', `<strong>${esc(what)} failed</strong> (HTTP ${err.status}): ${esc(err.message)}`);
  }
}

function clearRequestBanners() {
  clearBanner('auth');
  clearBanner('network');
}

// ---------------------------------------------------------------------------------------------
// token

function readToken() {
  let token = null;
  const match = /(?:^#|&)token=([^&]*)/.exec(location.hash);
  if (match) {
    try { token = decodeURIComponent(match[1]); } catch (_) { token = match[1]; }
    try { sessionStorage.setItem('pyagent.token', token); } catch (_) { /* storage disabled */ }
    history.replaceState(null, '', location.pathname + location.search);
  }
  if (token == null) {
    try { token = sessionStorage.getItem('pyagent.token'); } catch (_) { token = S.token; }
  }
  return token || null;
}

// ---------------------------------------------------------------------------------------------
// the graph (3D with ForceGraph3D, 2D with ForceGraph), behind one small interface

function webglAvailable() {
  try {
    const canvas = document.createElement('canvas');
    const gl = canvas.getContext('webgl2') || canvas.getContext('webgl');
    if (!gl) return false;
    const lose = gl.getExtension('WEBGL_lose_context');
    if (lose) lose.loseContext();
    return true;
  } catch (_) {
    return false;
  }
}

function loadScript(src) {
  return new Promise((resolve, reject) => {
    const el = document.createElement('script');
    el.src = src;
    el.onload = () => resolve();
    el.onerror = () => reject(new Error('cannot load ' + src));
    document.head.appendChild(el);
  });
}

function nodeColor(n) {
  return n.id === S.selected ? SELECTED_COLOR : KIND_COLOR[n.kind] || '#999';
}
function linkColor(l) {
  return l._flash > S.now ? FLASH_COLOR : EDGE_COLOR[l.kind] || '#4a5568';
}
function nodeTooltip(n) {
  const f = n.figures || {};
  return `<div class="tip"><b>${esc(n.label)}</b> <span>${esc(n.kind)} · ${esc(n.status)}</span><br>` +
    `calls ${fmtInt(f.calls)} · tokens ${fmtTokens(f.input_tokens, f.output_tokens)}` +
    (f.cost_usd != null ? ` · ${fmtCost(f.cost_usd)}` : '') + '</div>';
}

// three.js classes come from the bundle's own objects (3d-force-graph does not export THREE):
// a node's default object is a Mesh of a SphereGeometry with a MeshLambertMaterial.
const three = { Mesh: null, Geometry: null, Material: null, sphere: null, materials: {} };

function haloMaterial(status) {
  if (!three.materials[status]) {
    three.materials[status] = new three.Material({
      color: '#000000', emissive: STATUS_RING[status], transparent: true,
      opacity: status === 'running' ? 0.4 : 0.5, depthWrite: false,
    });
  }
  return three.materials[status];
}

// A shell around the node, thick enough to be seen on the smallest ones.
function haloRadius(radius, pulse) {
  return radius + Math.max(2.5, radius * 0.45) * pulse;
}

function syncHalo(n) {
  const obj = n.__threeObj;
  if (!obj) return false;
  if (!three.Mesh) {
    if (!obj.geometry || !obj.material || obj.geometry.type !== 'SphereGeometry') return false;
    three.Mesh = obj.constructor;
    three.Geometry = obj.geometry.constructor;
    three.Material = obj.material.constructor;
    three.sphere = new three.Geometry(1, 16, 12);
  }
  let halo = n.__halo;
  if (halo && halo.parent !== obj) halo = n.__halo = null;
  const want = STATUS_RING[n.status];
  if (!want) {
    if (halo) halo.visible = false;
    return true;
  }
  if (!halo) {
    halo = n.__halo = new three.Mesh(three.sphere, haloMaterial(n.status));
    obj.add(halo);
  }
  halo.visible = true;
  halo.material = haloMaterial(n.status);
  halo.userData.radius = Math.cbrt(n._val || 1) * REL_3D;
  halo.scale.setScalar(haloRadius(halo.userData.radius, 1));
  return true;
}

// What the 3D and the 2D graph share: arrows, live-edge particles, the layout's pace, events.
function configureGraph(g, particleWidth) {
  g.linkDirectionalArrowLength(3)
    .linkDirectionalArrowRelPos(1)
    .linkDirectionalParticleWidth(particleWidth)
    .linkDirectionalParticleSpeed(0.03)
    .linkDirectionalParticleColor(() => FLASH_COLOR)
    .cooldownTicks(150)
    .cooldownTime(10000)
    .warmupTicks(0)
    .d3AlphaDecay(0.045)
    .onNodeClick((n) => select(n.id))
    .onNodeHover((n) => hover(n))
    .onEngineStop(engineStopped);
  g.pauseAnimation(); // frames are drawn by loop()
}

function make3d(el) {
  const g = new window.ForceGraph3D(el, { controlType: 'orbit' });
  g.backgroundColor('#0b0e14')
    .showNavInfo(false)
    .nodeId('id')
    .nodeVal((n) => n._val || 1)
    .nodeRelSize(REL_3D)
    .nodeColor(nodeColor)
    .nodeOpacity(0.95)
    .nodeResolution(12)
    .nodeLabel(nodeTooltip)
    .linkColor(linkColor)
    .linkOpacity(0.55)
    .linkWidth(0)
    .enableNodeDrag(false);
  configureGraph(g, 2.2);
  let resolution = 12;
  return {
    mode: '3d',
    g,
    data: () => g.graphData(),
    setData(nodes, links) {
      const want = nodes.length < 300 ? 12 : nodes.length < 1500 ? 8 : 5;
      if (want !== resolution) { resolution = want; g.nodeResolution(want); }
      g.linkDirectionalArrowLength(links.length < 600 ? 3 : 0);
      g.warmupTicks(warmup(nodes.length));
      tuneForces(g, nodes.length);
      g.graphData({ nodes, links });
    },
    refresh(nodes, links) {
      if (nodes) g.nodeColor(nodeColor); // re-runs the in-place update of every node object
      if (links) g.linkColor(linkColor);
    },
    emit: (link) => g.emitParticle(link),
    toScreen: (n) => g.graph2ScreenCoords(n.x, n.y, n.z),
    canvas: () => g.renderer().domElement,
    shown: (n) => !!n.__threeObj,
    fit: () => g.zoomToFit(400, 40),
    renderOnce: () => g.resumeAnimation().pauseAnimation(), // one frame, now
    start: () => g.resumeAnimation(),
    stop: () => g.pauseAnimation(),
    size: (w, h) => g.width(w).height(h),
    frame(t) { // halos: status rings, the running ones pulse
      const pulse = 1 + 0.35 * Math.sin(t / 180);
      for (const n of S.nodes.values()) {
        if (n.__halo && n.__halo.visible && n.status === 'running') {
          n.__halo.scale.setScalar(haloRadius(n.__halo.userData.radius, pulse));
        }
      }
      if (three.materials.running) three.materials.running.opacity = 0.4 + 0.15 * Math.sin(t / 180);
    },
    afterUpdate() {
      for (const n of S.nodes.values()) syncHalo(n);
    },
  };
}

// Small fleets spread out so every node can be read and clicked; big ones stay compact.
// Big ones also settle in fewer steps: each change restarts the layout, and every step moves
// every node.
function tuneForces(g, count) {
  const size = sizeClass(count);
  if (size === S.forceSize) return;
  S.forceSize = size;
  g.d3Force('charge').strength(size === 'small' ? -160 : size === 'medium' ? -50 : -20);
  g.d3Force('link').distance(size === 'small' ? 45 : size === 'medium' ? 30 : 20);
  g.d3AlphaDecay(size === 'small' ? 0.045 : size === 'medium' ? 0.08 : 0.12)
    .d3VelocityDecay(size === 'small' ? 0.4 : 0.55)
    .cooldownTicks(size === 'small' ? 150 : size === 'medium' ? 60 : 35);
}

function sizeClass(count) {
  return count < 150 ? 'small' : count < 1000 ? 'medium' : 'large';
}

// Layout steps run at once when the graph changes (cheap, no drawing), so that fewer frames are
// needed to settle: many for the first picture, a few for each change after it.
function warmup(count) {
  const first = !S.laidOut;
  S.laidOut = true;
  S.engineRunning = true;
  if (first) return count < 150 ? 150 : count < 1000 ? 40 : 15;
  return count < 300 ? 8 : count < 2000 ? 3 : 1;
}

function draw2d(n, ctx, scale) {
  const r = Math.sqrt(n._val || 1) * REL_2D;
  const ring = STATUS_RING[n.status];
  if (ring) {
    const pulse = n.status === 'running' ? 1.5 + Math.sin(performance.now() / 180) : 1.5;
    ctx.beginPath();
    ctx.arc(n.x, n.y, r + pulse + 1.5 / scale, 0, 2 * Math.PI);
    ctx.strokeStyle = ring;
    ctx.lineWidth = 2 / scale + (n.status === 'running' ? 0.6 : 0.8);
    ctx.stroke();
  }
  ctx.beginPath();
  ctx.arc(n.x, n.y, r, 0, 2 * Math.PI);
  ctx.fillStyle = KIND_COLOR[n.kind] || '#999';
  ctx.fill();
  if (n.id === S.selected) {
    ctx.lineWidth = 2.5 / scale;
    ctx.strokeStyle = SELECTED_COLOR;
    ctx.stroke();
  }
  const showLabel = n.id === S.selected || n.id === S.hovered
    || (scale > 1.6 && S.nodes.size < 300) || (scale > 3.5);
  if (showLabel) {
    const size = Math.max(10 / scale, 1.5);
    ctx.font = `${size}px system-ui, sans-serif`;
    ctx.textAlign = 'center';
    ctx.textBaseline = 'top';
    ctx.fillStyle = '#d7dde8';
    ctx.fillText(n.label, n.x, n.y + r + 2 / scale + 1);
  }
}

function make2d(el) {
  const g = new window.ForceGraph(el);
  g.backgroundColor('#0b0e14')
    .nodeId('id')
    .nodeVal((n) => n._val || 1)
    .nodeRelSize(REL_2D)
    .nodeLabel(nodeTooltip)
    .nodeCanvasObject(draw2d)
    .nodeCanvasObjectMode(() => 'replace')
    .linkColor(linkColor)
    .linkWidth((l) => (l._flash > S.now ? 2 : 1))
    .autoPauseRedraw(false);
  configureGraph(g, 3);
  return {
    mode: '2d',
    g,
    data: () => g.graphData(),
    setData(nodes, links) {
      g.linkDirectionalArrowLength(links.length < 1500 ? 3 : 0);
      g.warmupTicks(warmup(nodes.length));
      tuneForces(g, nodes.length);
      g.graphData({ nodes, links });
    },
    refresh() { /* the canvas reads the node objects on every frame */ },
    emit: (link) => g.emitParticle(link),
    toScreen: (n) => g.graph2ScreenCoords(n.x, n.y),
    canvas: () => el.querySelector('canvas'),
    shown: (n) => n.x !== undefined,
    fit: () => g.zoomToFit(400, 40),
    renderOnce: () => g.resumeAnimation().pauseAnimation(),
    start: () => g.resumeAnimation(),
    stop: () => g.pauseAnimation(),
    size: (w, h) => g.width(w).height(h),
    frame() {},
    afterUpdate() {},
  };
}

let fitTimer = null;

// Frame the whole graph while the user has not moved the camera.
function scheduleFit() {
  if (fitTimer != null) return;
  fitTimer = setTimeout(() => {
    fitTimer = null;
    if (!S.interacted && S.graph && S.nodes.size) {
      wake();
      S.graph.fit();
    }
  }, 900);
}

function engineStopped() {
  S.engineRunning = false;
  if (!S.interacted && S.graph && S.nodes.size) {
    wake();
    S.graph.fit();
  }
}

function hover(n) {
  S.hovered = n ? n.id : null;
  $('graph').style.cursor = n ? 'pointer' : '';
}

// Rendering. The graph libraries would draw every display frame; here they draw only while
// something moves (layout, running nodes, live edges, the camera), at most FRAME_MS apart, and
// at the display's rate only while the pointer is on the graph. An idle fleet costs no frames.
function wake() {
  S.lastActivity = performance.now();
}

function pointerActive() {
  const now = performance.now();
  S.lastActivity = now;
  S.inputUntil = now + INPUT_MS;
  if (!S.continuous && S.graph) {
    S.continuous = true;
    S.graph.start();
  }
}

function renderNow(t) {
  const start = performance.now();
  S.lastRender = start;
  S.graph.frame(t);
  if (S.continuous) return;
  S.graph.renderOnce();
  // keep drawing (layout steps included) under a quarter of the main thread
  const cost = performance.now() - start;
  S.renderCost = S.renderCost ? 0.8 * S.renderCost + 0.2 * cost : cost;
  S.frameMs = Math.min(1000, Math.max(FRAME_MS, 4 * S.renderCost));
}

function loop(t) {
  requestAnimationFrame(loop);
  const G = S.graph;
  if (!G) return;
  const now = performance.now();
  if (S.continuous) {
    if (now < S.inputUntil) {
      G.frame(t);
      return;
    }
    S.continuous = false;
    G.stop();
  }
  const busy = S.running > 0 || S.flashing.size > 0 || S.engineRunning || now - S.lastActivity < IDLE_MS;
  if (busy && now - S.lastRender >= (S.frameMs || FRAME_MS)) renderNow(t);
}

function expireFlashes() {
  S.now = Date.now();
  if (!S.flashing.size) return;
  let expired = false;
  for (const link of S.flashing) {
    if (link._flash <= S.now) { S.flashing.delete(link); expired = true; }
  }
  if (expired) markDirty('links');
}

function nodeScreenPosition(id) {
  const n = S.nodes.get(id);
  if (!S.graph || !n || n.x === undefined || !S.graph.data().nodes.includes(n)) return null;
  const canvas = S.graph.canvas();
  if (!canvas) return null;
  const rect = canvas.getBoundingClientRect();
  const p = S.graph.toScreen(n);
  if (!p || !Number.isFinite(p.x) || !Number.isFinite(p.y)) return null;
  if (p.x < 0 || p.y < 0 || p.x > rect.width || p.y > rect.height) return null;
  return { x: rect.left + p.x, y: rect.top + p.y };
}

// ---------------------------------------------------------------------------------------------
// the model: nodes and links, from snapshots and stream events

function emptyFigures() {
  return {
    calls: 0, errors: 0, input_tokens: 0, output_tokens: 0, cached_tokens: 0, cost_usd: null,
    latency_p50_s: null, latency_p95_s: null, kv_bytes: null,
  };
}

function makeNode(id, kind, label, runId, ts) {
  return {
    id, kind, label, run_id: runId, status: 'running', first_seen: ts, last_seen: ts,
    figures: emptyFigures(), definition: null, recent: [],
    _active: 0, _val: 1, _born: performance.now(), _evt: 0,
  };
}

function addNode(n, near) {
  const anchor = near && S.nodes.get(near);
  if (anchor && anchor.x !== undefined) {
    const j = () => (Math.random() - 0.5) * 12;
    n.x = anchor.x + j();
    n.y = anchor.y + j();
    if (anchor.z !== undefined) n.z = anchor.z + j();
  }
  S.nodes.set(n.id, n);
  S.dirty.structure = true;
  return n;
}

function linkKey(source, target) {
  return source + '\u0001' + target;
}

function ensureLink(source, target, kind) {
  const key = linkKey(source, target);
  let link = S.links.get(key);
  if (!link) {
    link = {
      _key: key, _s: source, _t: target, source, target, kind, count: 0, last_at: 0, _flash: 0,
      _born: performance.now(),
    };
    S.links.set(key, link);
    S.dirty.structure = true;
  }
  return link;
}

function removeNode(id) {
  S.nodes.delete(id);
  S.dirty.structure = true;
}

function labelFromId(id, runId) {
  const prefix = id.slice(0, id.indexOf(':') + 1);
  if (prefix === 'run:') return id.slice(4);
  if (runId != null && id.startsWith(prefix + runId + ':')) return id.slice(prefix.length + runId.length + 1);
  return id.slice(prefix.length);
}

function kindOfId(id) {
  return NODE_KIND[id.slice(0, id.indexOf(':'))] || 'run';
}

function spanLabel(ev) {
  const found = ev.attributes && ev.attributes[LABEL_ATTR[ev.kind]];
  if (found) return String(found);
  const space = ev.name.indexOf(' ');
  return space >= 0 && space < ev.name.length - 1 ? ev.name.slice(space + 1) : ev.name;
}

function agentFilterMatches(label) {
  return !S.filter.agent || label.toLowerCase().includes(S.filter.agent.toLowerCase());
}

// Make sure a node exists (when the filters let it in): created from the event before any
// snapshot knows it.
function ensureNode(id, kind, label, runId, ts, near) {
  let n = S.nodes.get(id);
  if (!n) n = addNode(makeNode(id, kind, label, runId, ts), near);
  return n;
}

function handleSpan(ev) {
  const id = Number(ev.id);
  if (Number.isFinite(id)) S.lastEventId = id;
  const runId = ev.run_id;
  if (!S.knownRuns.has(runId)) {
    S.knownRuns.add(runId);
    scheduleRuns(300);
  }
  if (runId === S.traceRun) scheduleTrace(TRACE_MS);
  if (ev.kind === 'run' && ev.phase !== 'start') scheduleRuns(500);
  if (ev.phase === 'start') startSpan(ev, id);
  else closeSpan(ev, id);
}

function startSpan(ev, eventId) {
  const runId = ev.run_id;
  const ts = ev.timestamp;
  const parent = ev.parent_id ? S.spans.get(ev.parent_id) : null;
  const nodeId = ev.node;
  const agentAbove = parent ? parent.agent : null;
  const agent = ev.kind === 'agent' ? nodeId : agentAbove;
  S.spans.set(ev.span_id, { node: nodeId, agent });
  if (S.spans.size > SPAN_MAX) S.spans.delete(S.spans.keys().next().value);
  if (ev.kind === 'run' && ev.attributes && typeof ev.attributes['pyagent.manifest.agents'] === 'object') {
    S.definitions.set(runId, ev.attributes['pyagent.manifest.agents'] || {});
  }

  // where the span comes from: the stream says so on live events; replayed ones are inferred
  // the way the observer's topology does it
  let edge = ev.edge;
  if (!edge) {
    if (ev.kind === 'step') edge = ['run:' + runId, nodeId];
    else if (parent && ev.kind === 'agent') edge = [agentAbove || parent.node || 'run:' + runId, nodeId];
    else if (parent && (ev.kind === 'tool_call' || ev.kind === 'llm_call')) edge = [agentAbove || 'run:' + runId, nodeId];
  }
  const kind = ev.kind === 'agent'
    ? (agentAbove || (edge && edge[0].startsWith('agent:')) ? 'subagent' : 'agent')
    : kindOfId(nodeId);
  const label = ev.kind === 'run' ? spanLabel(ev) : ev.kind === 'goal' ? null : spanLabel(ev);

  if (S.filter.run && runId !== S.filter.run) return;
  let accept = true;
  if (S.filter.agent) {
    if (S.nodes.has(nodeId)) accept = true;
    else if (kind === 'agent' || kind === 'subagent') accept = agentFilterMatches(label);
    else if (kind === 'tool' || kind === 'backend') accept = !!(edge && S.nodes.has(edge[0]));
    else accept = false;
  }
  if (!accept) return;

  const runNode = 'run:' + runId;
  let n = S.nodes.get(nodeId);
  const created = !n;
  if (!S.nodes.has(runNode)) ensureNode(runNode, 'run', runId, runId, ts);
  if (ev.kind === 'run' && label) S.nodes.get(runNode).label = label;
  if (!n) {
    if (edge && !S.nodes.has(edge[0])) {
      // the source (a step, with an agent filter) comes along
      ensureNode(edge[0], kindOfId(edge[0]), labelFromId(edge[0], runId), runId, ts, runNode);
    }
    const near = edge ? edge[0] : runNode;
    n = ensureNode(nodeId, kind, label || labelFromId(nodeId, runId),
      kind === 'tool' || kind === 'backend' ? null : runId, ts, near);
    if (kind === 'agent' || kind === 'subagent') {
      const defs = S.definitions.get(runId);
      if (defs && defs[n.label]) n.definition = defs[n.label];
    }
  }
  n._active += 1;
  n._evt = eventId;
  n.status = 'running';
  n.last_seen = Math.max(n.last_seen, ts);
  if (ev.kind === 'step') {
    const previous = S.lastStep.get(runId);
    if (previous && previous !== nodeId && S.nodes.has(previous)) {
      ensureLink(previous, nodeId, 'next').count += 1;
    }
    S.lastStep.set(runId, nodeId);
  }
  if (edge && S.nodes.has(edge[0]) && S.nodes.has(edge[1])) {
    const link = ensureLink(edge[0], edge[1], EDGE_KIND[ev.kind] || 'contains');
    link.count += 1;
    link.last_at = ts;
    if (ev.edge) {
      dashboard.edgesLit += 1;
      link._flash = Date.now() + FLASH_MS;
      S.flashing.add(link);
      S.pendingParticles.add(link);
      S.dirty.links = true;
    }
  }
  S.pendingLatency.push({ id: eventId, node: nodeId, event_ts: ts * 1000 });
  markDirty(created ? 'structure' : 'nodes');
}

function closeSpan(ev, eventId) {
  const span = S.spans.get(ev.span_id);
  S.spans.delete(ev.span_id);
  const n = S.nodes.get(span ? span.node : ev.node);
  if (!n) return;
  n._evt = eventId;
  n.last_seen = Math.max(n.last_seen, ev.timestamp);
  n._active = Math.max(0, n._active - 1);
  if (n._active === 0) n.status = CLOSED[ev.phase] || 'ok';
  const outcome = ev.kind === 'run' && ev.attributes ? ev.attributes['pyagent.run.status'] : null;
  if (typeof outcome === 'string') { // a run that did not reach its goal is never shown as ok
    n.outcome = outcome;
    if (outcome !== 'succeeded' && n.status === 'ok') n.status = 'error';
  }
  markDirty('nodes');
}

function applySnapshot(snap, startedAt) {
  const cursor = snap.source ? snap.source.last_event_id : 0;
  S.snapshotCursor = cursor;
  if (S.lastEventId == null) S.lastEventId = cursor;
  const keep = new Set();
  const sourceOf = new Map();
  for (const e of snap.edges) if (!sourceOf.has(e.target)) sourceOf.set(e.target, e.source);
  for (const sn of snap.nodes) {
    keep.add(sn.id);
    let n = S.nodes.get(sn.id);
    if (!n) n = addNode(makeNode(sn.id, sn.kind, sn.label, sn.run_id, sn.first_seen), sourceOf.get(sn.id));
    if (n.kind !== sn.kind) n.kind = sn.kind;
    n.label = sn.label;
    n.run_id = sn.run_id;
    n.figures = sn.figures;
    n.definition = sn.definition;
    n.outcome = sn.outcome;
    n.first_seen = sn.first_seen;
    n.last_seen = Math.max(n.last_seen, sn.last_seen);
    if (!(n._evt > cursor)) { // the stream has nothing newer for this node
      n.status = sn.status;
      n._active = sn.status === 'running' ? Math.max(n._active, 1) : 0;
    }
    if (sn.kind === 'step' && sn.run_id && !S.lastStep.has(sn.run_id)) S.lastStep.set(sn.run_id, sn.id);
  }
  for (const [id, n] of S.nodes) {
    if (!keep.has(id) && n._born < startedAt) removeNode(id);
  }
  const keepLinks = new Set();
  for (const se of snap.edges) {
    if (!S.nodes.has(se.source) || !S.nodes.has(se.target)) continue;
    const link = ensureLink(se.source, se.target, se.kind);
    keepLinks.add(link._key);
    link.kind = se.kind;
    link.count = se.count;
    link.last_at = se.last_at;
  }
  for (const [key, link] of S.links) {
    if ((!keepLinks.has(key) && link._born < startedAt) || !S.nodes.has(link._s) || !S.nodes.has(link._t)) {
      S.links.delete(key);
      S.flashing.delete(link);
      S.dirty.structure = true;
    }
  }
  renderStats(snap.metrics);
  renderHealth(snap.health);
  renderAlerts(snap.alerts);
  mergeSeries(snap.series || []);
  sourceBanner(snap.source);
  markDirty(S.dirty.structure ? 'structure' : 'nodes');
  if (S.selected) renderDetail();
}

function recomputeSizes() {
  const byCost = S.sizeBy === 'cost';
  let max = 0;
  let running = 0;
  for (const n of S.nodes.values()) {
    const f = n.figures;
    n._size = byCost ? f.cost_usd || 0 : (f.input_tokens || 0) + (f.output_tokens || 0);
    if (n._size > max) max = n._size;
    if (n.status === 'running') running += 1;
  }
  for (const n of S.nodes.values()) {
    // a few distinct sizes only: the 3D graph keeps one sphere geometry per size
    n._val = max > 0 ? 1 + Math.round(Math.sqrt(n._size / max) * 8) * 3 : 1;
  }
  S.running = running;
}

function markDirty(what) {
  S.dirty[what] = true;
  S.dirty.list = true;
  if (S.flushTimer == null) {
    const every = S.nodes.size < 300 ? FLUSH_MS : S.nodes.size < 1000 ? 2 * FLUSH_MS : 4 * FLUSH_MS;
    const wait = Math.max(0, S.lastFlush + every - performance.now());
    S.flushTimer = setTimeout(flush, wait);
  }
}

function flush() {
  S.flushTimer = null;
  S.lastFlush = performance.now();
  S.now = Date.now();
  const G = S.graph;
  if (!G) return;
  const dirty = S.dirty;
  S.dirty = { structure: false, nodes: false, links: false, list: false };
  recomputeSizes();
  if (dirty.structure) {
    G.setData([...S.nodes.values()], [...S.links.values()]);
    scheduleFit();
  } else if (dirty.nodes || dirty.links) {
    G.refresh(dirty.nodes, dirty.links);
  }
  if (S.pendingParticles.size) {
    for (const link of S.pendingParticles) {
      // a link joins the layout (its ends become node objects) on the graph's next update
      if (typeof link.source === 'object' && S.links.get(link._key) === link) G.emit(link);
    }
    S.pendingParticles.clear();
  }
  if (dirty.list) renderNodeList();
  $('graph-empty').hidden = S.nodes.size > 0;
  if (dirty.structure || dirty.nodes) renderDetailHeader();
  wake();
  const batch = S.pendingLatency;
  S.pendingLatency = [];
  // the graph applies its data on its own next tick; once it has, a frame shows it
  setTimeout(() => requestAnimationFrame(() => afterFlush(batch, 0)), 2);
}

function afterFlush(batch, tries) {
  if (!S.graph) return;
  S.graph.afterUpdate();
  renderNow(performance.now()); // draw the change now rather than on the next paced frame
  if (!batch.length) return;
  const shownAt = Date.now();
  const later = [];
  const out = dashboard.latencies;
  for (const entry of batch) {
    const n = S.nodes.get(entry.node);
    if (!n) continue; // filtered out meanwhile
    if (S.graph.shown(n) || tries > 60) out.push({ ...entry, shown_at: shownAt });
    else later.push(entry);
  }
  if (out.length > LATENCY_MAX) out.splice(0, out.length - LATENCY_MAX);
  if (later.length) requestAnimationFrame(() => afterFlush(later, tries + 1));
}

// ---------------------------------------------------------------------------------------------
// node list and detail

function nodeOrder(a, b) {
  return KINDS.indexOf(a.kind) - KINDS.indexOf(b.kind) || String(a.run_id || '').localeCompare(String(b.run_id || ''))
    || a.label.localeCompare(b.label);
}

let listKey = '';
let listRendered = 0;
let listTimer = null;

function renderNodeList() {
  const now = performance.now();
  const every = S.nodes.size < 1000 ? 500 : 1500;
  if (now - listRendered < every) {
    if (listTimer == null) listTimer = setTimeout(() => { listTimer = null; renderNodeList(); }, every);
    return;
  }
  listRendered = now;
  const query = $('node-search').value.trim().toLowerCase();
  const all = [...S.nodes.values()];
  const matching = query
    ? all.filter((n) => n.label.toLowerCase().includes(query) || n.id.toLowerCase().includes(query) || n.kind.includes(query))
    : all;
  matching.sort(nodeOrder);
  const shown = matching.slice(0, LIST_LIMIT);
  const multiRun = S.knownRuns.size > 1 || new Set(all.map((n) => n.run_id).filter(Boolean)).size > 1;
  const rows = shown.map((n) => {
    const f = n.figures;
    const run = multiRun && n.run_id && (n.kind !== 'run' || n.label !== n.run_id)
      ? ` <span class="muted">· ${esc(n.run_id)}</span>` : '';
    return `<tr data-id="${esc(n.id)}" tabindex="0"${n.id === S.selected ? ' class="sel"' : ''}>` +
      `<td>${kindDot(n.kind)}</td><td class="nm" title="${esc(n.id)}">${esc(n.label)}${run}</td>` +
      `<td>${esc(n.kind)}</td><td>${pill(n.status)}</td><td class="num">${fmtInt(f.calls)}</td>` +
      `<td class="num">${fmtCompact((f.input_tokens || 0) + (f.output_tokens || 0))}</td>` +
      `<td class="num">${f.cost_usd == null ? '—' : fmtCost(f.cost_usd)}</td></tr>`;
  }).join('');
  const html = '<table><thead><tr><th></th><th>name</th><th>kind</th><th>status</th>' +
    '<th class="num">calls</th><th class="num">tokens</th><th class="num">cost</th></tr></thead>' +
    `<tbody>${rows}</tbody></table>` +
    (matching.length > shown.length ? `<p class="muted">${shown.length} of ${matching.length} shown: refine the search.</p>` : '') +
    (!all.length ? '<p class="muted">No nodes yet.</p>' : !matching.length ? '<p class="muted">No node matches.</p>' : '');
  if (html !== listKey) {
    listKey = html;
    $('node-list').innerHTML = html;
  }
  $('node-count').textContent = `${all.length} node${all.length === 1 ? '' : 's'}`;
}

function select(id) {
  if (id != null && !S.nodes.has(id)) return false;
  const previous = S.selected;
  S.selected = id;
  const n = id != null ? S.nodes.get(id) : null;
  if (n && n.run_id && n.run_id !== S.traceRun) setTraceRun(n.run_id, true);
  renderDetail();
  if (n) refreshSelected();
  listRendered = 0;
  renderNodeList();
  if (previous !== id) markDirty('nodes');
  const row = id != null ? $('node-list').querySelector(`tr[data-id="${CSS.escape(id)}"]`) : null;
  if (row) row.scrollIntoView({ block: 'nearest' });
  return true;
}

let detailKey = '';
let selectedInflight = false;

// The selected node's figures and latest spans (the periodic snapshot leaves spans out).
async function refreshSelected() {
  const id = S.selected;
  if (id == null || selectedInflight) return;
  selectedInflight = true;
  try {
    const found = await api('/api/observability/nodes/' + encodeURIComponent(id));
    const n = S.nodes.get(id);
    if (n && S.selected === id) {
      n.recent = found.recent;
      n.figures = found.figures;
      n.definition = found.definition;
      renderDetail();
    }
  } catch (err) {
    if (!(err instanceof ApiError && err.status === 404)) reportError(err, 'the node ' + id);
  } finally {
    selectedInflight = false;
  }
}

function renderDetailHeader() {
  if (S.selected) renderDetail();
}

function renderDetail() {
  const el = $('detail');
  const n = S.selected ? S.nodes.get(S.selected) : null;
  if (!n) {
    const html = S.selected
      ? `<p class="muted">${esc(S.selected)} is not in the current view (filters).</p>`
      : '<p class="muted">Select a node in the graph or the list to see its definition, figures and recent spans.</p>';
    if (detailKey !== html) { detailKey = html; el.innerHTML = html; el.removeAttribute('data-node'); }
    return;
  }
  const f = n.figures || emptyFigures();
  const outgoing = [...S.links.values()].filter((l) => l._s === n.id);
  const incoming = [...S.links.values()].filter((l) => l._t === n.id);
  const chips = (links, end) => links.map((l) => {
    const other = S.nodes.get(end === 't' ? l._t : l._s);
    return `<span class="chip">${esc(other ? other.label : end === 't' ? l._t : l._s)} ×${fmtInt(l.count)}</span>`;
  }).join(' ');
  const byKind = (kind) => outgoing.filter((l) => l.kind === kind);
  const sections = [];
  sections.push(`<h3>${kindDot(n.kind)}<span>${esc(n.label)}</span>${pill(n.status)}` +
    '<button class="close" data-action="deselect" title="Close" aria-label="Close">×</button></h3>');
  sections.push('<dl class="kv">' +
    `<dt>kind</dt><dd>${esc(n.kind)}</dd><dt>id</dt><dd><code>${esc(n.id)}</code></dd>` +
    (n.outcome ? `<dt>outcome</dt><dd>${esc(n.outcome.replace(/_/g, ' '))}</dd>` : '') +
    (n.run_id ? `<dt>run</dt><dd>${esc(n.run_id)} <button class="linkbtn" data-action="trace" data-run="${esc(n.run_id)}">show trace</button></dd>` : '') +
    `<dt>seen</dt><dd>${fmtTime(n.first_seen)} – ${fmtTime(n.last_seen)}</dd></dl>`);
  const fig = (k, v) => `<div><div class="k">${k}</div><div class="v">${v}</div></div>`;
  sections.push('<h4>Figures</h4><div class="figs">' +
    fig('calls', fmtInt(f.calls)) + fig('errors', fmtInt(f.errors)) + fig('cost', fmtCost(f.cost_usd)) +
    fig('tokens in', fmtInt(f.input_tokens)) + fig('tokens out', fmtInt(f.output_tokens)) +
    fig('cached', fmtInt(f.cached_tokens)) + fig('latency p50', fmtDur(f.latency_p50_s)) +
    fig('latency p95', fmtDur(f.latency_p95_s)) + fig('KV bytes', fmtBytes(f.kv_bytes)) + '</div>');
  const d = n.definition;
  if (d) {
    const limits = d.limits ? Object.entries(d.limits).filter(([, v]) => v != null)
      .map(([k, v]) => `<span class="chip">${esc(k)}: ${esc(v)}</span>`).join(' ') : '';
    const perms = d.permissions ? Object.entries(d.permissions).filter(([, v]) => v && v.length !== 0)
      .map(([k, v]) => `<span class="chip">${esc(k)}: ${esc(Array.isArray(v) ? v.join(', ') : v)}</span>`).join(' ') : '';
    sections.push('<h4>Definition</h4>' +
      (d.role ? `<div class="role">${esc(d.role)}</div>` : '') +
      '<dl class="kv">' +
      `<dt>backend</dt><dd>${esc(d.backend || '—')}${d.model ? ' · ' + esc(d.model) : ''}</dd>` +
      `<dt>tools</dt><dd>${(d.tools || []).map((t) => `<span class="chip">${esc(t)}</span>`).join(' ') || '—'}</dd>` +
      `<dt>subagents</dt><dd>${(d.subagents || []).map((t) => `<span class="chip">${esc(t)}</span>`).join(' ') || '—'}</dd>` +
      `<dt>limits</dt><dd>${limits || '—'}</dd>` +
      (perms ? `<dt>permissions</dt><dd>${perms}</dd>` : '') + '</dl>');
  }
  const rel = [];
  if (byKind('calls').length) rel.push(`<dt>tools called</dt><dd>${chips(byKind('calls'), 't')}</dd>`);
  if (byKind('uses').length) rel.push(`<dt>backends</dt><dd>${chips(byKind('uses'), 't')}</dd>`);
  if (byKind('delegates').length) rel.push(`<dt>delegates to</dt><dd>${chips(byKind('delegates'), 't')}</dd>`);
  if (byKind('contains').length) rel.push(`<dt>steps</dt><dd>${chips(byKind('contains'), 't')}</dd>`);
  if (incoming.length && (n.kind === 'tool' || n.kind === 'backend' || n.kind === 'agent' || n.kind === 'subagent')) {
    rel.push(`<dt>${n.kind === 'tool' ? 'called by' : n.kind === 'backend' ? 'used by' : 'from'}</dt><dd>${chips(incoming, 's')}</dd>`);
  }
  if (rel.length) sections.push('<h4>Connections</h4><dl class="kv">' + rel.join('') + '</dl>');
  const recent = n.recent || [];
  sections.push(`<h4>Recent spans (${recent.length})</h4>` + (recent.length
    ? '<table class="recent"><thead><tr><th>span</th><th>status</th><th>start</th><th class="num">duration</th>' +
      '<th class="num">in / out</th></tr></thead><tbody>' +
      recent.slice().reverse().map((s) => `<tr data-span="${esc(s.span_id)}"><td>${esc(s.name)}` +
        `${s.run_id && s.run_id !== n.run_id ? ` <span class="muted">${esc(s.run_id)}</span>` : ''}` +
        `${s.error ? `<div class="err">${esc(s.error)}</div>` : ''}</td><td>${pill(s.status)}</td>` +
        `<td>${fmtTime(s.start)}</td><td class="num">${fmtDur(s.duration_s)}</td>` +
        `<td class="num">${s.input_tokens == null ? '—' : fmtTokens(s.input_tokens, s.output_tokens)}</td></tr>`).join('') +
      '</tbody></table>'
    : '<p class="muted">None finished yet.</p>'));
  const html = sections.join('');
  if (html !== detailKey) {
    detailKey = html;
    el.innerHTML = html;
    el.dataset.node = n.id;
  }
}

// ---------------------------------------------------------------------------------------------
// stats, health, alerts, charts

function renderStats(m) {
  if (!m) return;
  const stat = (k, v, small) => `<div class="stat"><div class="k">${k}</div><div class="v">${v}${small ? ` <small>${small}</small>` : ''}</div></div>`;
  const html = stat('runs', fmtInt(m.runs), `${fmtInt(m.running_runs)} running`) +
    stat('LLM calls', fmtInt(m.llm_calls)) + stat('tool calls', fmtInt(m.tool_calls)) +
    stat('errors', fmtInt(m.errors)) +
    stat('tokens in / out', `${fmtCompact(m.input_tokens)} / ${fmtCompact(m.output_tokens)}`) +
    stat('cached', fmtCompact(m.cached_tokens)) +
    stat('cost', fmtCost(m.cost_usd)) + stat('tokens/s', fmtNum(m.tokens_per_s, 1)) +
    stat('KV held', fmtBytes(m.kv_bytes), m.kv_capacity_bytes ? `/ ${fmtBytesShort(m.kv_capacity_bytes)}` : '') +
    stat('queue', fmtInt(m.queue_waiting), `${fmtInt(m.requests_running)} running`) +
    stat('sources', fmtInt(m.sources));
  const el = $('stats');
  if (el.innerHTML !== html) el.innerHTML = html;
}

function renderHealth(h) {
  if (!h) return;
  const checks = h.checks || [];
  const failing = checks.filter((c) => c.status !== 'pass' && c.value != null);
  const noData = checks.filter((c) => c.value == null);
  const html = `<span class="badge st-${esc(h.status)}" title="health status and score">health ${esc(h.status)}` +
    `${h.score == null ? '' : ' · ' + Math.round(h.score)}</span>` +
    (failing.length ? '<span class="checks">failing: ' + failing.map((c) => `<span class="chip st-${esc(c.status)}" ` +
      `data-check="${esc(c.name)}" title="value ${esc(fmtNum(c.value, 3))}, target ${esc(c.target)}">${esc(c.name)}</span>`).join('') +
      '</span>' : '') +
    (noData.length ? `<span class="checks" title="${esc(noData.map((c) => c.name).join(', '))}">${noData.length} without data</span>` : '') +
    (h.capped_by && h.capped_by.length ? `<span class="checks">capped by ${h.capped_by.map(esc).join(', ')}</span>` : '');
  const el = $('health');
  if (el.innerHTML !== html) el.innerHTML = html;
  el.dataset.status = h.status;
}

function renderAlerts(alerts) {
  if (!alerts) return;
  const html = alerts.length
    ? '<h3 class="sub">Alerts</h3><ul>' + alerts.map((a) => `<li data-alert="${esc(a.name)}">${pill(a.state)}` +
      `<b>${esc(a.name)}</b>${a.severity ? ` <span class="chip">${esc(a.severity)}</span>` : ''}` +
      `<span>${esc(a.summary)}</span>` +
      `${a.active_since ? `<span class="muted">since ${fmtTime(a.active_since)}</span>` : ''}</li>`).join('') + '</ul>'
    : '<p class="muted">No alert firing or pending.</p>';
  const el = $('alerts');
  if (el.innerHTML !== html) el.innerHTML = html;
}

const CHARTS = [
  { key: 'tokens_per_s', title: 'Tokens/s', color: '#22d3ee', fmt: (v) => fmtNum(v, 1) },
  { key: 'cost_usd', title: 'Cost (USD)', color: '#fbbf24', fmt: fmtCost },
  { key: 'kv_bytes', title: 'KV cache held', color: '#a78bfa', fmt: fmtBytes },
  { key: 'queue_waiting', title: 'Queue waiting', color: '#f472b6', fmt: fmtInt },
  { key: 'health_score', title: 'Health score', color: '#34d399', fmt: (v) => fmtNum(v, 0) },
];
const charts = [];

function axisValues(fmt) {
  return (u, values) => values.map((v) => (v == null ? '' : fmt(v)));
}

function fmtBytesShort(v) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let x = v;
  let i = 0;
  while (Math.abs(x) >= 1024 && i < units.length - 1) { x /= 1024; i += 1; }
  return (x % 1 && x < 10 ? x.toFixed(1) : String(Math.round(x))) + ' ' + units[i];
}

function compactFor(key) {
  if (key === 'kv_bytes') return fmtBytesShort;
  if (key === 'cost_usd') return (v) => (v === 0 ? '$0' : '$' + (v < 0.01 ? v.toPrecision(2) : v.toFixed(2)));
  if (key === 'tokens_per_s') return (v) => (v < 10 && v % 1 ? v.toFixed(1) : fmtCompact(v));
  return fmtCompact;
}

// tick steps: whole numbers for counts, powers of two for bytes
const COUNT_STEPS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1e3, 2e3, 5e3, 1e4, 2e4, 5e4, 1e5, 2e5, 5e5, 1e6, 1e7, 1e8, 1e9];
const BYTE_STEPS = Array.from({ length: 45 }, (_, i) => 2 ** i);

function stepsFor(key) {
  if (key === 'kv_bytes') return BYTE_STEPS;
  if (key === 'queue_waiting' || key === 'health_score') return COUNT_STEPS;
  return undefined;
}

function initCharts() {
  const root = $('charts');
  root.innerHTML = CHARTS.map((c) => `<div class="chart" data-key="${c.key}"><div class="chart-head">` +
    `<span>${c.title}</span><b class="chart-value">—</b></div><div class="chart-plot"></div></div>`).join('');
  for (const c of CHARTS) {
    const card = root.querySelector(`[data-key="${c.key}"]`);
    const plot = card.querySelector('.chart-plot');
    const axis = { stroke: '#8a93a6', grid: { stroke: '#1f2633', width: 1 }, ticks: { stroke: '#1f2633', width: 1 }, font: '10px system-ui, sans-serif' };
    const u = new window.uPlot({
      width: Math.max(120, plot.clientWidth),
      height: 120,
      legend: { show: false },
      cursor: { points: { show: false }, drag: { x: false, y: false } },
      scales: {
        x: { time: true },
        y: { range: (u2, min, max) => [Math.min(0, min ?? 0), max > 0 ? max * 1.1 : c.key === 'kv_bytes' ? 1024 : 1] },
      },
      series: [{}, { stroke: c.color, width: 1.5, fill: c.color + '22', spanGaps: false, points: { show: false } }],
      axes: [
        { ...axis, size: 24, space: 50 },
        { ...axis, size: c.key === 'kv_bytes' ? 62 : 46, space: 24, incrs: stepsFor(c.key), values: axisValues(compactFor(c.key)) },
      ],
    }, [[], []], plot);
    charts.push({ spec: c, u, card });
  }
  const ro = new ResizeObserver(() => {
    for (const chart of charts) {
      const w = chart.card.querySelector('.chart-plot').clientWidth;
      if (w > 0 && Math.abs(w - chart.u.width) > 2) chart.u.setSize({ width: w, height: 120 });
    }
  });
  ro.observe(root);
}

function mergeSeries(points) {
  const last = S.series.length ? S.series[S.series.length - 1].t : -Infinity;
  let added = false;
  for (const p of points) {
    if (p && p.t > last) { S.series.push(p); added = true; }
  }
  if (added) {
    if (S.series.length > SERIES_MAX) S.series.splice(0, S.series.length - SERIES_MAX);
    updateCharts();
  }
}

function updateCharts() {
  const xs = S.series.map((p) => p.t);
  const latest = S.series[S.series.length - 1];
  for (const chart of charts) {
    const key = chart.spec.key;
    chart.u.setData([xs, S.series.map((p) => p[key])]);
    const value = latest ? latest[key] : null;
    const text = latest == null ? '—' : key === 'cost_usd' && value == null ? 'unknown' : chart.spec.fmt(value);
    const b = chart.card.querySelector('.chart-value');
    if (b.textContent !== text) b.textContent = text;
  }
}

// The data folder is missing, locked or damaged: say why (the observer's words), and whether
// what is shown is what was read before.
function dataBanner(message, stale) {
  const text = String(message || 'unknown reason').replace(/\.\s*$/, '');
  setBanner('data', stale ? 'warn' : 'error',
    `<strong>The observer cannot read its data folder.</strong> ${esc(text)}. <span class="muted">` +
    (stale ? 'Showing what was read before; retrying.' : 'Retrying; the page fills in once a run writes there.') +
    '</span>');
}

function sourceBanner(source) {
  if (!source) return;
  if (source.status === 'unavailable') dataBanner(source.message, source.events_read > 0);
  else clearBanner('data');
}

// ---------------------------------------------------------------------------------------------
// snapshot loop

let snapInflight = false;
let snapAgain = false;
let snapCost = 0;
let snapAt = 0;
let snapFailed = false;

function filterQuery() {
  const q = new URLSearchParams({ recent: '0' }); // a node's spans come with its detail
  if (S.filter.run) q.append('run', S.filter.run);
  if (S.filter.agent) q.append('agent', S.filter.agent);
  if (S.filter.window) q.append('window', S.filter.window);
  const s = q.toString();
  return s ? '?' + s : '';
}

async function refreshSnapshot() {
  if (snapInflight) { snapAgain = true; return; }
  snapInflight = true;
  const startedAt = performance.now();
  const gen = S.filterGen;
  try {
    const snap = await api('/api/observability' + filterQuery());
    if (gen === S.filterGen) {
      clearRequestBanners();
      applySnapshot(snap, startedAt);
      snapFailed = false;
      refreshSelected();
    } else {
      snapAgain = true;
    }
  } catch (err) {
    snapFailed = true;
    reportError(err, 'the fleet snapshot');
  } finally {
    snapInflight = false;
    snapAt = performance.now();
    snapCost = snapAt - startedAt;
    if (snapAgain) { snapAgain = false; refreshSnapshot(); }
  }
}

function snapshotTicker() {
  const since = performance.now() - snapAt;
  const every = Math.max(SNAPSHOT_MS, snapCost * 4);
  const behind = Math.max(S.sourceCursor, S.lastEventId || 0) > S.snapshotCursor;
  if (!snapInflight && since >= every && (behind || snapFailed || since >= SNAPSHOT_STALE_MS)) {
    refreshSnapshot();
  }
}

// ---------------------------------------------------------------------------------------------
// the stream: fetch() + a small server-sent events parser, resumed with Last-Event-ID

let streamAbort = null;
let streamGen = 0;

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

async function readEvents(body, onEvent, onAny) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let rest = '';
  let event = '';
  let data = [];
  let id = null;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    onAny();
    rest += decoder.decode(value, { stream: true });
    const end = rest.lastIndexOf('\n');
    if (end < 0) continue;
    const lines = rest.slice(0, end).split('\n');
    rest = rest.slice(end + 1);
    for (let line of lines) {
      if (line.endsWith('\r')) line = line.slice(0, -1);
      if (line === '') {
        if (data.length) onEvent(event || 'message', data.join('\n'), id);
        event = '';
        data = [];
        id = null;
        continue;
      }
      if (line[0] === ':') continue; // a comment (keepalive)
      const colon = line.indexOf(':');
      const field = colon < 0 ? line : line.slice(0, colon);
      let val = colon < 0 ? '' : line.slice(colon + 1);
      if (val[0] === ' ') val = val.slice(1);
      if (field === 'event') event = val;
      else if (field === 'data') data.push(val);
      else if (field === 'id') id = val;
    }
  }
}

function onStreamEvent(event, data, id) {
  let body;
  try {
    body = JSON.parse(data);
  } catch (_) {
    return;
  }
  if (event === 'span') {
    if (id != null && S.lastEventId != null && Number(id) <= S.lastEventId) return; // seen
    clearBanner('stream');
    handleSpan(body);
  } else if (event === 'metrics') {
    renderStats(body.metrics);
    renderHealth(body.health);
    renderAlerts(body.alerts);
    if (body.point) mergeSeries([body.point]);
    if (body.source) {
      S.sourceCursor = body.source.last_event_id;
      sourceBanner(body.source);
    }
  } else if (event === 'hello') {
    if (S.lastEventId == null && typeof body.cursor === 'number') S.lastEventId = body.cursor;
  } else if (event === 'reset') { // the store was replaced: its ids start again
    S.lastEventId = 0;
    refreshSnapshot();
  } else if (event === 'error') {
    setBanner('stream', 'error', `<strong>The live stream cannot read the store</strong>: ${esc(body.message)} (retrying)`);
  }
}

async function streamLoop() {
  const gen = ++streamGen;
  let backoff = 1000;
  while (gen === streamGen) {
    const abort = new AbortController();
    streamAbort = abort;
    let lastData = performance.now();
    const watchdog = setInterval(() => {
      if (performance.now() - lastData > SILENCE_MS) abort.abort();
    }, 1000);
    let status = 0;
    try {
      const headers = authHeaders({ Accept: 'text/event-stream' });
      if (S.lastEventId != null) headers['Last-Event-ID'] = String(S.lastEventId);
      const res = await fetch('/api/stream', { headers, signal: abort.signal, cache: 'no-store' });
      status = res.status;
      if (res.status === 401) {
        authBanner('');
      } else if (!res.ok || !res.body) {
        setBanner('stream', 'warn', `<strong>The live stream failed</strong> (HTTP ${res.status}); retrying.`);
      } else {
        clearBanner('stream');
        clearBanner('auth');
        setConn('live', 'live');
        backoff = 1000;
        await readEvents(res.body, onStreamEvent, () => { lastData = performance.now(); });
      }
    } catch (err) {
      if (gen !== streamGen) break;
      if (!(err && err.name === 'AbortError')) {
        setBanner('stream', 'warn', `<strong>The live stream was cut</strong> (${esc(err && err.message)}); reconnecting.`);
      }
    } finally {
      clearInterval(watchdog);
    }
    if (gen !== streamGen) break;
    const wait = status === 401 ? 10000 : backoff;
    if (status !== 401) setConn('reconnecting', `reconnecting in ${Math.round(wait / 1000)} s`);
    await sleep(wait);
    backoff = Math.min(backoff * 2, 15000);
  }
}

function restartStream() {
  streamGen += 1;
  if (streamAbort) streamAbort.abort();
  streamLoop();
}

// ---------------------------------------------------------------------------------------------
// runs, lineage and waterfall

let runsTimer = null;

function scheduleRuns(ms) {
  if (runsTimer != null) return;
  runsTimer = setTimeout(() => { runsTimer = null; refreshRuns(); }, ms);
}

async function refreshRuns() {
  try {
    const list = await api('/api/runs');
    S.runs = list.runs;
    for (const r of S.runs) S.knownRuns.add(r.run_id);
    renderRunSelects();
    if (!S.tracePinned || !S.traceRun) {
      const want = S.filter.run || (S.runs[0] && S.runs[0].run_id) || null;
      if (want && want !== S.traceRun) setTraceRun(want, false);
    }
  } catch (err) {
    if (err.kind !== 'unavailable') reportError(err, 'the list of runs');
  }
}

function runLabel(r) {
  return `${r.run_id} · ${r.name} (${r.status})`;
}

function renderRunSelects() {
  const filter = $('f-run');
  const trace = $('trace-run');
  const options = S.runs.map((r) => `<option value="${esc(r.run_id)}">${esc(runLabel(r))}</option>`).join('');
  const filterHtml = '<option value="">all runs</option>' + options;
  if (filter.dataset.html !== filterHtml) {
    filter.innerHTML = filterHtml;
    filter.dataset.html = filterHtml;
  }
  filter.value = S.filter.run;
  const traceHtml = S.runs.length ? options : '<option value="">no runs yet</option>';
  if (trace.dataset.html !== traceHtml) {
    trace.innerHTML = traceHtml;
    trace.dataset.html = traceHtml;
  }
  trace.value = S.traceRun || '';
}

function setTraceRun(runId, pinned) {
  if (pinned) S.tracePinned = true;
  if (runId === S.traceRun) return;
  S.traceRun = runId;
  S.traceSpan = null;
  S.traceDetail = null;
  $('span-detail').innerHTML = '';
  $('trace-run').value = runId || '';
  scheduleTrace(0);
}

let traceTimer = null;
let traceInflight = false;
let traceAgain = false;
let traceAt = 0;
let traceStarted = 0;
let traceEvery = TRACE_MS;

function scheduleTrace(ms) {
  if (traceTimer != null) {
    if (ms > 0) return;
    clearTimeout(traceTimer);
  }
  const wait = ms > 0 ? Math.max(0, traceAt + Math.max(ms, traceEvery) - performance.now()) : 0;
  traceTimer = setTimeout(() => { traceTimer = null; refreshTrace(); }, wait);
}

async function refreshTrace() {
  if (traceInflight) { traceAgain = true; return; }
  const run = S.traceRun;
  if (!run) return;
  traceInflight = true;
  traceStarted = performance.now();
  try {
    const path = '/api/runs/' + encodeURIComponent(run);
    const [detail, lineage] = await Promise.all([api(path), api(path + '/lineage')]);
    if (run === S.traceRun) {
      S.traceDetail = detail;
      renderRunSummary(detail.run);
      renderLineage(lineage);
      renderWaterfall(detail);
    }
  } catch (err) {
    if (err.status === 404) {
      $('waterfall').innerHTML = `<p class="muted">Run ${esc(run)} is not stored yet.</p>`;
    } else {
      reportError(err, `run ${run}`);
    }
  } finally {
    traceInflight = false;
    const now = performance.now();
    traceEvery = Math.max(TRACE_MS, 4 * (now - traceStarted)); // big runs refresh less often
    traceAt = now;
    if (traceAgain) { traceAgain = false; scheduleTrace(TRACE_MS); }
  }
}

function renderRunSummary(r) {
  const html = `${pill(r.status)} ${esc(r.name)} · ${fmtTime(r.start)}` +
    ` · ${r.duration_s == null ? 'running' : fmtDur(r.duration_s)}` +
    ` · ${fmtInt(r.llm_calls)} LLM calls · ${fmtInt(r.tool_calls)} tool calls · ${fmtInt(r.errors)} errors` +
    ` · tokens ${fmtTokens(r.input_tokens, r.output_tokens)} (${fmtCompact(r.cached_tokens)} cached) · cost ${fmtCost(r.cost_usd)}`;
  const el = $('run-summary');
  if (el.innerHTML !== html) el.innerHTML = html;
}

function lineageItem(node) {
  const f = node.figures || emptyFigures();
  const figs = `${fmtInt(f.calls)} call${f.calls === 1 ? '' : 's'} · tokens ${fmtTokens(f.input_tokens, f.output_tokens)}` +
    ` · ${fmtCost(f.cost_usd)}`;
  const summary = `<span class="kind-tag kind-${esc(node.kind)}">${esc(node.kind)}</span>` +
    `<button class="lin-name" data-select="${esc(node.id)}" title="select in the graph">${esc(node.name)}</button>` +
    `${pill(node.status)}<span class="lin-figs">${figs}</span>`;
  const attrs = `data-id="${esc(node.id)}" data-kind="${esc(node.kind)}" data-name="${esc(node.name)}" ` +
    `data-status="${esc(node.status)}" data-input="${f.input_tokens}" data-output="${f.output_tokens}"`;
  if (!node.children.length) return `<li ${attrs}><div class="leaf">${summary}</div></li>`;
  const open = S.collapsed.has(node.id) ? '' : ' open';
  return `<li ${attrs}><details data-id="${esc(node.id)}"${open}><summary>${summary}</summary>` +
    `<ul>${node.children.map(lineageItem).join('')}</ul></details></li>`;
}

let lineageKey = '';

function renderLineage(lineage) {
  const html = `<ul>${lineageItem(lineage.root)}</ul>`;
  if (html !== lineageKey) {
    lineageKey = html;
    const el = $('lineage');
    el.innerHTML = html;
    el.dataset.run = lineage.run_id;
  }
}

function flattenSpans(roots) {
  const out = [];
  const walk = (span, depth) => {
    out.push([span, depth]);
    for (const child of span.children) walk(child, depth + 1);
  };
  for (const root of roots) walk(root, 0);
  return out;
}

let waterfallKey = '';

function renderWaterfall(detail) {
  const rows = flattenSpans(detail.spans);
  const nowS = Date.now() / 1000;
  let t0 = detail.run.start;
  let t1 = detail.run.end;
  for (const [s] of rows) {
    if (s.start != null && (t0 == null || s.start < t0)) t0 = s.start;
    const end = s.end != null ? s.end : nowS;
    if (detail.run.end == null && (t1 == null || end > t1)) t1 = end;
  }
  const el = $('waterfall');
  if (!rows.length || t0 == null) {
    el.innerHTML = '<p class="muted">No spans yet.</p>';
    waterfallKey = '';
    return;
  }
  const span = Math.max(1e-6, (t1 ?? nowS) - t0);
  const ticks = [0, 0.25, 0.5, 0.75, 1].map((q) => `<span style="left:${q * 100}%">${fmtDur(q * span)}</span>`).join('');
  const head = '<div class="wf-head"><div>span</div>' +
    `<div class="wf-axis">${ticks}</div><div class="num">duration</div><div class="num">tokens in/out</div>` +
    '<div class="num">cost</div></div>';
  const body = rows.slice(0, WATERFALL_LIMIT).map(([s, depth]) => {
    const start = s.start ?? t0;
    const end = s.end ?? nowS;
    const left = ((start - t0) / span) * 100;
    const width = Math.max(0, ((end - start) / span) * 100);
    const iteration = s.attributes && s.attributes['pyagent.loop.iteration'];
    const running = s.end == null;
    return `<div class="wf-row${s.span_id === S.traceSpan ? ' sel' : ''}" role="button" tabindex="0" ` +
      `data-span="${esc(s.span_id)}" data-kind="${esc(s.kind)}" data-name="${esc(s.name)}" data-status="${esc(s.status)}">` +
      `<div class="wf-name" style="padding-left:${depth * 14}px" title="${esc(s.name)}">` +
      `<span class="kind-tag kind-${esc(s.kind)}">${esc(s.kind.replace('_call', ''))}</span>` +
      `<span>${esc(s.name)}</span>${iteration ? `<span class="it">#${esc(iteration)}</span>` : ''}` +
      `${s.status !== 'ok' && !running ? pill(s.status) : ''}</div>` +
      `<div class="wf-track"><div class="wf-bar kind-${esc(s.kind)} st-${esc(s.status)}${running ? ' running' : ''}" ` +
      `style="left:${left.toFixed(3)}%;width:${width.toFixed(3)}%"></div></div>` +
      `<div class="num">${running ? 'running' : fmtDur(s.duration_s)}</div>` +
      `<div class="num">${fmtTokens(s.input_tokens, s.output_tokens)}</div>` +
      `<div class="num">${s.cost_usd == null ? '—' : fmtCost(s.cost_usd)}</div></div>`;
  }).join('');
  const more = rows.length > WATERFALL_LIMIT ? `<div class="wf-more">${rows.length - WATERFALL_LIMIT} more spans not shown.</div>` : '';
  const html = head + body + more;
  if (html !== waterfallKey) {
    waterfallKey = html;
    el.innerHTML = html;
    el.dataset.run = detail.run.run_id;
  }
  if (S.traceSpan) renderSpanDetail(S.traceSpan);
}

function findSpan(roots, id) {
  for (const [s] of flattenSpans(roots)) if (s.span_id === id) return s;
  return null;
}

function prettyValue(value) {
  if (typeof value === 'string') {
    const t = value.trim();
    if ((t.startsWith('{') && t.endsWith('}')) || (t.startsWith('[') && t.endsWith(']'))) {
      try { return JSON.stringify(JSON.parse(t), null, 2); } catch (_) { /* as is */ }
    }
    return value;
  }
  return JSON.stringify(value, null, 2);
}

const SPAN_SHOWN = new Set(['gen_ai.tool.call.arguments', 'gen_ai.tool.call.result', 'exception.message', 'exception.type']);

function renderSpanDetail(spanId) {
  const el = $('span-detail');
  const s = S.traceDetail ? findSpan(S.traceDetail.spans, spanId) : null;
  if (!s) { el.innerHTML = ''; return; }
  const a = s.attributes || {};
  const t0 = S.traceDetail.run.start;
  const parts = [`<div class="box" data-span="${esc(s.span_id)}"><h3><span class="kind-tag kind-${esc(s.kind)}">${esc(s.kind)}</span>` +
    `${esc(s.name)} ${pill(s.status)}</h3><dl class="kv">` +
    `<dt>start</dt><dd>${fmtTime(s.start)}${t0 != null && s.start != null ? ` (+${fmtDur(s.start - t0)})` : ''}</dd>` +
    `<dt>duration</dt><dd>${s.end == null ? 'running' : fmtDur(s.duration_s)}</dd>` +
    (s.input_tokens != null ? `<dt>tokens</dt><dd>${fmtInt(s.input_tokens)} in · ${fmtInt(s.output_tokens)} out · ${fmtInt(s.cached_tokens)} cached</dd>` : '') +
    (s.kind === 'llm_call' ? `<dt>cost</dt><dd>${fmtCost(s.cost_usd)}</dd>` : '') +
    `<dt>span id</dt><dd><code>${esc(s.span_id)}</code></dd></dl>`];
  if (s.error) parts.push(`<h4>Error</h4><pre class="err">${esc(s.error)}</pre>`);
  if ('gen_ai.tool.call.arguments' in a) parts.push(`<h4>Tool arguments</h4><pre class="tool-args">${esc(prettyValue(a['gen_ai.tool.call.arguments']))}</pre>`);
  if ('gen_ai.tool.call.result' in a) parts.push(`<h4>Tool result</h4><pre class="tool-result">${esc(prettyValue(a['gen_ai.tool.call.result']))}</pre>`);
  const rest = Object.entries(a).filter(([k]) => !SPAN_SHOWN.has(k));
  if (rest.length) {
    parts.push('<h4>Attributes</h4><table class="attrs"><tbody>' + rest.map(([k, v]) => {
      const text = prettyValue(v);
      const cell = typeof v === 'object' && v !== null || String(text).length > 80 ? `<pre>${esc(text)}</pre>` : esc(text);
      return `<tr data-attr="${esc(k)}"><td>${esc(k)}</td><td>${cell}</td></tr>`;
    }).join('') + '</tbody></table>');
  }
  parts.push('</div>');
  const html = parts.join('');
  if (el.innerHTML !== html) el.innerHTML = html;
}

function selectSpan(spanId) {
  S.traceSpan = spanId;
  for (const row of $('waterfall').querySelectorAll('.wf-row.sel')) row.classList.remove('sel');
  const row = $('waterfall').querySelector(`.wf-row[data-span="${CSS.escape(spanId)}"]`);
  if (row) row.classList.add('sel');
  waterfallKey = '';
  renderSpanDetail(spanId);
}

// ---------------------------------------------------------------------------------------------
// legend, filters, wiring

function renderLegend() {
  const kinds = KINDS.map((k) => `<span>${kindDot(k)}${k}</span>`).join('');
  const rings = Object.entries(STATUS_RING).map(([s, c]) => `<span><span class="ring" style="border-color:${c}"></span>${s}</span>`).join('');
  const size = S.sizeBy === 'cost'
    ? 'size: cost' + ([...S.nodes.values()].some((n) => n.figures.cost_usd != null) ? '' : ' (unknown: no prices)')
    : 'size: tokens in + out';
  $('legend').innerHTML = kinds + rings + `<span><span class="dot" style="background:${FLASH_COLOR}"></span>live edge</span>` +
    `<span class="muted">${esc(size)}</span>`;
}

function applyFilters() {
  S.filter.run = $('f-run').value;
  S.filter.agent = $('f-agent').value.trim();
  S.filter.window = $('f-window').value;
  S.filterGen += 1;
  S.interacted = false;
  if (S.filter.run) setTraceRun(S.filter.run, true);
  refreshSnapshot();
}

function wire() {
  let agentTimer = null;
  $('f-run').addEventListener('change', applyFilters);
  $('f-window').addEventListener('change', applyFilters);
  $('f-agent').addEventListener('input', () => {
    clearTimeout(agentTimer);
    agentTimer = setTimeout(applyFilters, 300);
  });
  $('filters').addEventListener('submit', (e) => { e.preventDefault(); applyFilters(); });
  $('f-size').addEventListener('change', () => {
    S.sizeBy = $('f-size').value;
    renderLegend();
    markDirty('nodes');
  });
  $('node-search').addEventListener('input', () => { listRendered = 0; renderNodeList(); });
  const list = $('node-list');
  list.addEventListener('click', (e) => {
    const row = e.target.closest('tr[data-id]');
    if (row) select(row.dataset.id);
  });
  list.addEventListener('keydown', (e) => {
    const row = e.target.closest('tr[data-id]');
    if (!row) return;
    if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); select(row.dataset.id); }
    if (e.key === 'ArrowDown' && row.nextElementSibling) { e.preventDefault(); row.nextElementSibling.focus(); }
    if (e.key === 'ArrowUp' && row.previousElementSibling) { e.preventDefault(); row.previousElementSibling.focus(); }
  });
  $('detail').addEventListener('click', (e) => {
    const button = e.target.closest('[data-action]');
    if (!button) return;
    if (button.dataset.action === 'deselect') select(null);
    if (button.dataset.action === 'trace') {
      setTraceRun(button.dataset.run, true);
      $('trace-run').scrollIntoView({ behavior: 'smooth', block: 'start' });
    }
  });
  $('trace-run').addEventListener('change', () => setTraceRun($('trace-run').value || null, true));
  const waterfall = $('waterfall');
  waterfall.addEventListener('click', (e) => {
    const row = e.target.closest('.wf-row');
    if (row) selectSpan(row.dataset.span);
  });
  waterfall.addEventListener('keydown', (e) => {
    const row = e.target.closest('.wf-row');
    if (row && (e.key === 'Enter' || e.key === ' ')) { e.preventDefault(); selectSpan(row.dataset.span); }
  });
  const lineage = $('lineage');
  lineage.addEventListener('click', (e) => {
    const button = e.target.closest('[data-select]');
    if (!button) return;
    e.preventDefault(); // do not fold the branch
    select(button.dataset.select);
  });
  lineage.addEventListener('toggle', (e) => {
    const details = e.target;
    if (!details.dataset || !details.dataset.id) return;
    if (details.open) S.collapsed.delete(details.dataset.id);
    else S.collapsed.add(details.dataset.id);
    lineageKey = '';
  }, true);
  const graphEl = $('graph');
  for (const type of ['pointermove', 'pointerdown', 'wheel', 'keydown']) {
    graphEl.addEventListener(type, (e) => {
      if (type !== 'pointermove' || e.buttons) S.interacted = true;
      pointerActive();
    }, { passive: true, capture: true });
  }
  new ResizeObserver(() => {
    if (S.graph) {
      S.graph.size(graphEl.clientWidth, graphEl.clientHeight);
      wake();
    }
  }).observe(graphEl);
  window.addEventListener('hashchange', () => {
    if (!/token=/.test(location.hash)) return;
    S.token = readToken();
    clearBanner('auth');
    restartStream();
    refreshSnapshot();
    refreshRuns();
  });
}

async function createGraph() {
  const forced = new URLSearchParams(location.search).get('mode');
  let mode = forced === '2d' || forced === '3d' ? forced : null;
  let why = mode ? `forced by ?mode=${mode}` : '';
  if (!mode) {
    mode = webglAvailable() ? '3d' : '2d';
    why = mode === '3d' ? 'WebGL' : 'WebGL unavailable';
  }
  const el = $('graph');
  let graph = null;
  if (mode === '3d') {
    try {
      await loadScript('/static/vendor/3d-force-graph.min.js');
      graph = make3d(el);
    } catch (err) {
      el.innerHTML = '';
      mode = '2d';
      why = `3D failed: ${err && err.message}`;
    }
  }
  if (!graph) {
    await loadScript('/static/vendor/force-graph.min.js');
    graph = make2d(el);
  }
  graph.size(el.clientWidth, el.clientHeight);
  S.graph = graph;
  S.mode = mode;
  dashboard.mode = mode;
  document.body.dataset.mode = mode;
  $('mode-label').textContent = `${mode.toUpperCase()} · ${why}`;
  const other = mode === '3d' ? '2d' : '3d';
  const link = $('mode-switch');
  link.href = `?mode=${other}`;
  link.textContent = `switch to ${other.toUpperCase()}`;
  requestAnimationFrame(loop);
}

async function main() {
  S.token = readToken();
  wire();
  renderLegend();
  initCharts();
  renderNodeList();
  setInterval(expireFlashes, 250);
  await createGraph();
  await refreshSnapshot();
  streamLoop();
  refreshRuns();
  setInterval(snapshotTicker, 500);
  setInterval(() => scheduleRuns(0), RUNS_MS);
  setInterval(() => { if (S.traceRun && S.traceDetail && S.traceDetail.run.end == null) scheduleTrace(TRACE_MS); }, TRACE_MS);
  flush();
  dashboard.ready = true;
  document.body.dataset.ready = 'true';
}

main().catch((err) => {
  setBanner('network', 'error', `<strong>The dashboard failed to start:</strong> ${esc(err && err.message)}`);
  dashboard.ready = true;
});
