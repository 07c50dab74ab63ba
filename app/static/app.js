// fieldid field app: the bundle's ONNX model runs here, in the phone's browser (onnxruntime-web,
// WebAssembly). Settings come only from config.json, which `fieldid app build` copied from the
// bundles' manifest.json. The server is asked when the device is unsure (or when the user asks);
// if it is away, the device's answer stands. The inference token lives only in localStorage.
import * as ort from './ort/ort.wasm.min.mjs';
import { ImageInputError, preprocess } from './preprocess.js';

const RESPONSE_SCHEMA_VERSION = 1; // = fieldid.export.phone.RESPONSE_SCHEMA_VERSION
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const store = {
  get: (k, d = '') => { try { return localStorage.getItem(`fieldid.${k}`) ?? d; } catch { return d; } },
  set: (k, v) => { try { if (v === '' || v == null) localStorage.removeItem(`fieldid.${k}`); else localStorage.setItem(`fieldid.${k}`, v); } catch { /* private mode */ } },
};

let config = null;
let mode = null; // the current mode's config entry
let lastPhoto = null; // the Blob last classified (for "Ask the server")
let runCount = 0;
const sessions = new Map();

// ---------- runtime ----------
function chooseThreads() {
  const asked = Number(params.get('threads') || store.get('threads') || 0);
  const cores = navigator.hardwareConcurrency || 1;
  // Threads need SharedArrayBuffer, i.e. a cross-origin isolated page (COOP/COEP headers).
  if (!self.crossOriginIsolated) return 1;
  return asked > 0 ? Math.min(asked, 16) : Math.max(1, Math.min(4, cores));
}
const threads = chooseThreads();
ort.env.wasm.wasmPaths = new URL('ort/', location.href).href;
ort.env.wasm.numThreads = threads;
ort.env.logLevel = 'error';

const hex = (buf) => Array.from(new Uint8Array(buf), (b) => b.toString(16).padStart(2, '0')).join('');

function modelOf(m, precision) {
  return m.models.find((x) => x.precision === precision) || m.models.find((x) => x.precision === m.default_precision);
}

function precisionOf(m) {
  const p = params.get('precision') || store.get(`precision.${m.key}`) || m.default_precision;
  return m.models.some((x) => x.precision === p) ? p : m.default_precision;
}

/** The ONNX Runtime session of a mode's model, loaded once (the file's sha256 checked as on download). */
function session(m, precision) {
  const key = `${m.key}/${precision}`;
  if (!sessions.has(key)) {
    const p = (async () => {
      const model = modelOf(m, precision);
      const resp = await fetch(model.file);
      if (!resp.ok) throw new Error(`could not load the model ${model.file} (HTTP ${resp.status})`);
      const bytes = new Uint8Array(await resp.arrayBuffer());
      if (crypto.subtle) { // only in secure contexts (https, localhost)
        const digest = hex(await crypto.subtle.digest('SHA-256', bytes));
        if (digest !== model.sha256) throw new Error(`the model file ${model.file} is damaged (sha256 differs); reload the app`);
      }
      const s = await ort.InferenceSession.create(bytes, { executionProviders: ['wasm'], graphOptimizationLevel: 'all' });
      return { s, model };
    })();
    p.catch(() => sessions.delete(key));
    sessions.set(key, p);
  }
  return sessions.get(key);
}

function softmax(logits, temperature) {
  // float64, max subtracted: as numpy does in fieldid.export.phone.softmax
  const z = Array.from(logits, (v) => v / temperature);
  const mx = Math.max(...z);
  const e = z.map((v) => Math.exp(v - mx));
  const sum = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / sum);
}

/** One answer in the shared response schema (fieldid.export.phone.prediction), source "device". */
function prediction(logits, m, { version, latencyMs, unknownScore, k }) {
  const probs = softmax(logits, m.temperature);
  const order = probs.map((_, i) => i).sort((a, b) => probs[b] - probs[a] || a - b).slice(0, Math.min(k, m.labels.length));
  const top = order.map((i) => ({ label: m.labels[i], index: i, probability: probs[i] }));
  const threshold = m.unknown_threshold;
  const unknown = unknownScore != null && threshold != null && unknownScore > threshold;
  return {
    answer: {
      schema_version: RESPONSE_SCHEMA_VERSION, model: m.name, version, model_version: m.model_version,
      source: 'device', top_k: top, confidence: top[0].probability,
      unknown, unknown_score: unknownScore, unknown_threshold: threshold,
      needs_fallback: unknown || top[0].probability < m.fallback_threshold,
      fallback_threshold: m.fallback_threshold, latency_ms: Math.round(latencyMs * 1000) / 1000,
    },
    probabilities: probs,
  };
}

/** Photo -> on-device answer. Throws ImageInputError for a photo the device cannot use. */
async function classify(blob, m, precision = precisionOf(m)) {
  const t0 = performance.now();
  const sessionP = session(m, precision); // loads while the photo decodes
  const pre = await preprocess(blob, m.preprocess, { maxPixels: config.max_pixels, maxBytes: config.max_file_bytes });
  const { s, model } = await sessionP;
  const c = m.preprocess.crop_size;
  const t1 = performance.now();
  const outs = await s.run({ [model.input_name]: new ort.Tensor('float32', pre.tensor, [1, 3, c, c]) });
  const t2 = performance.now();
  const unknownScore = model.unknown_output && outs[model.unknown_output] ? Number(outs[model.unknown_output].data[0]) : null;
  const result = prediction(outs[model.output_name].data, m, {
    version: model.sha256.slice(0, 12), latencyMs: t2 - t0, unknownScore, k: config.top_k,
  });
  result.timings_ms = { decode: pre.decodeMs, preprocess: pre.preprocessMs, model: t2 - t1, total: t2 - t0 };
  result.precision = model.precision;
  result.size_bytes = model.size_bytes;
  result.image_size = [pre.width, pre.height];
  return result;
}

// ---------- server fallback ----------
// "same-origin": the app's own host, whose reverse proxy forwards predictions/ to TorchServe.
function serverUrl() {
  const s = (store.get('server') || config.server || '').replace(/\/+$/, '');
  return s === 'same-origin' ? new URL('.', location.href).href.replace(/\/+$/, '') : s;
}

function explainHttp(status, body) {
  const detail = String((body && (body.error || body.message)) || body || '').slice(0, 200);
  if ([400, 401, 403].includes(status) && /token/i.test(detail)) {
    return `the server refused the token (HTTP ${status}); paste the current inference key in Settings`;
  }
  if (status === 404) return `the server has no model named "${mode.name}" (HTTP 404)`;
  return `the server answered HTTP ${status}${detail ? `: ${detail}` : ''}`;
}

/** POST the photo to TorchServe; never throws: returns {ok, answer?, message, roundTripMs}. */
async function askServer(blob, m) {
  const base = serverUrl();
  if (!base) return { ok: false, message: 'no server is set (Settings)' };
  const ctrl = new AbortController();
  const timeoutS = config.server_timeout_s;
  const timer = setTimeout(() => ctrl.abort(), timeoutS * 1000);
  const headers = { 'Content-Type': blob.type || 'application/octet-stream' };
  const token = store.get('token');
  if (token) headers.Authorization = `Bearer ${token}`;
  const t0 = performance.now();
  try {
    const r = await fetch(`${base}/predictions/${encodeURIComponent(m.name)}`, {
      method: 'POST', body: blob, headers, signal: ctrl.signal, mode: 'cors', cache: 'no-store', credentials: 'omit',
    });
    const text = await r.text();
    let body = text;
    try { body = JSON.parse(text); } catch { /* plain text error */ }
    const roundTripMs = performance.now() - t0;
    if (!r.ok) return { ok: false, status: r.status, roundTripMs, message: explainHttp(r.status, body) };
    if (!body || !Array.isArray(body.top_k) || !body.top_k.length || !('confidence' in body)) {
      return { ok: false, status: r.status, roundTripMs, message: "the server's answer is not a fieldid prediction" };
    }
    return { ok: true, answer: body, roundTripMs, message: '' };
  } catch (e) {
    if (ctrl.signal.aborted) return { ok: false, message: `the server at ${base} did not answer within ${timeoutS} s` };
    return { ok: false, message: `the server at ${base} is not reachable (offline, down, or not allowing this app's origin)` };
  } finally {
    clearTimeout(timer);
  }
}

// ---------- page ----------
const pretty = (label) => { const s = label.replace(/_/g, ' ').trim(); return s.charAt(0).toUpperCase() + s.slice(1); };
const pct = (p) => `${(100 * p).toFixed(2)}%`;

function renderTopk(list, top) {
  list.replaceChildren(...top.map((t) => {
    const li = document.createElement('li');
    li.dataset.label = t.label;
    li.dataset.probability = String(t.probability);
    const name = document.createElement('span'); name.textContent = pretty(t.label);
    const p = document.createElement('span'); p.textContent = pct(t.probability);
    const bar = document.createElement('span'); bar.className = 'bar';
    const fill = document.createElement('span'); fill.style.width = `${Math.max(1, 100 * t.probability).toFixed(1)}%`;
    bar.append(fill);
    li.append(name, p, bar);
    return li;
  }));
}

function setTop1(labelEl, probEl, answer) {
  const t = answer.top_k[0];
  labelEl.textContent = pretty(t.label);
  labelEl.dataset.label = t.label;
  probEl.textContent = pct(t.probability);
  probEl.dataset.probability = String(t.probability);
}

function showError(message) {
  $('error').textContent = message;
  $('error').hidden = !message;
}

function setState(state) {
  $('app').dataset.state = state;
}

function clearAnswers() {
  $('device-card').hidden = true;
  $('server-card').hidden = true;
  $('unknown-slot').replaceChildren();
  $('raw').textContent = '';
  $('ask-server').disabled = true;
  showError('');
}

function renderDevice(result) {
  const a = result.answer;
  $('device-card').hidden = false;
  setTop1($('top1'), $('top1-prob'), a);
  renderTopk($('topk'), a.top_k);
  const slot = $('unknown-slot');
  slot.replaceChildren();
  if (a.unknown) {
    const u = document.createElement('p');
    u.className = 'unknown';
    u.dataset.testid = 'unknown';
    u.setAttribute('data-testid', 'unknown');
    u.textContent = `Unknown: not one of the ${mode.labels.length} classes this model knows (closest below).`;
    slot.append(u);
  }
  const note = mode.class_notes[a.top_k[0].label];
  $('device-notes').textContent = note ? `${pretty(a.top_k[0].label)}: ${note}.` : '';
  const t = result.timings_ms;
  $('device-info').textContent = `${t.total.toFixed(1)} ms on this device (decode ${t.decode.toFixed(1)}, `
    + `preprocess ${t.preprocess.toFixed(1)}, model ${t.model.toFixed(1)}) · ONNX ${result.precision} · `
    + `${(result.size_bytes / 1e6).toFixed(1)} MB · ${threads} thread${threads > 1 ? 's' : ''}`
    + (a.needs_fallback ? ` · unsure (below ${pct(a.fallback_threshold)}${a.unknown ? ', unknown' : ''})` : '');
}

function renderServer(reply, because) {
  $('server-card').hidden = false;
  if (reply.ok) {
    setTop1($('server-top1'), $('server-top1-prob'), reply.answer);
    renderTopk($('server-topk'), reply.answer.top_k);
    $('server-message').textContent = `asked because ${because}; ${reply.roundTripMs.toFixed(0)} ms round trip`
      + (reply.answer.unknown ? ' · the server says: unknown' : '');
  } else {
    for (const id of ['server-top1', 'server-top1-prob']) {
      $(id).textContent = '';
      delete $(id).dataset.label;
      delete $(id).dataset.probability;
    }
    $('server-topk').replaceChildren();
    $('server-message').textContent = `Asked because ${because}, but ${reply.message}. The device's answer stands.`;
  }
}

function writeRaw(device, server) {
  $('raw').textContent = JSON.stringify({ device, server }, null, 1);
}

async function identify(blob) {
  const run = ++runCount;
  clearAnswers();
  setState('working');
  lastPhoto = blob;
  const img = $('photo');
  if (img.src) URL.revokeObjectURL(img.src);
  img.src = URL.createObjectURL(blob);
  $('preview').hidden = false;
  let device = null, server = null;
  try {
    device = await classify(blob, mode);
    if (run !== runCount) return;
    renderDevice(device);
    $('ask-server').disabled = !serverUrl();
    if (device.answer.needs_fallback && serverUrl()) {
      const because = device.answer.unknown ? 'the device says unknown'
        : `the device was unsure (${pct(device.answer.confidence)} < ${pct(device.answer.fallback_threshold)})`;
      setState('asking');
      writeRaw(device, null);
      server = await askServer(blob, mode);
      if (run !== runCount) return;
      renderServer(server, because);
    }
  } catch (e) {
    if (run !== runCount) return;
    if (e instanceof ImageInputError) {
      $('preview').hidden = true;
      if (e.format && serverUrl()) { // e.g. HEIC: the server's intake reads it
        showError(`${e.message} Asking the server instead.`);
        setState('asking');
        server = await askServer(blob, mode);
        renderServer(server, `this browser cannot read ${e.format}`);
      } else {
        showError(e.format ? `${e.message} Set a server in Settings to send such photos there, or use a JPEG.` : e.message);
      }
    } else {
      showError(`The model could not run on this device: ${e.message}`);
    }
    setState('error');
    writeRaw(device, server);
    $('app').dataset.run = String(run);
    return;
  }
  writeRaw(device, server);
  setState('done');
  $('app').dataset.run = String(run);
}

async function askNow() {
  if (!lastPhoto) return;
  const run = runCount;
  setState('asking');
  const reply = await askServer(lastPhoto, mode);
  if (run !== runCount) return;
  renderServer(reply, 'you asked');
  const raw = JSON.parse($('raw').textContent || '{}');
  writeRaw(raw.device ?? null, reply);
  setState('done');
  $('app').dataset.asked = String(Number($('app').dataset.asked || 0) + 1);
}

function selectMode(key) {
  mode = config.modes.find((m) => m.key === key) || config.modes[0];
  store.set('mode', mode.key);
  for (const b of $('modes').children) b.setAttribute('aria-selected', String(b.dataset.mode === mode.key));
  $('tagline').textContent = mode.tagline;
  $('summary').textContent = mode.summary;
  const sel = $('precision');
  sel.replaceChildren(...mode.models.map((x) => new Option(
    `ONNX ${x.precision} · ${(x.size_bytes / 1e6).toFixed(1)} MB${x.precision === mode.default_precision ? ' (default)' : ''}`,
    x.precision, false, x.precision === precisionOf(mode))));
  clearAnswers();
  $('preview').hidden = true;
  lastPhoto = null;
  $('app').dataset.mode = mode.key;
  session(mode, precisionOf(mode)).then(
    () => { $('loading').hidden = true; if ($('app').dataset.state === 'loading') setState('idle'); },
    (e) => { $('loading').hidden = true; showError(`The model could not be loaded: ${e.message}`); setState('error'); });
}

function renderModes() {
  const nav = $('modes');
  nav.replaceChildren(...config.modes.map((m) => {
    const b = document.createElement('button');
    b.type = 'button'; b.role = 'tab'; b.dataset.mode = m.key; b.textContent = m.title;
    b.setAttribute('data-testid', `mode-${m.key}`);
    b.addEventListener('click', () => selectMode(m.key));
    return b;
  }));
  nav.hidden = config.modes.length < 2;
}

function renderSettings() {
  $('server-url').value = serverUrl();
  $('server-token').value = '';
  $('server-token').placeholder = store.get('token') ? 'token saved on this phone (paste to replace)' : 'paste the inference key';
  const tsel = $('threads');
  const max = self.crossOriginIsolated ? Math.min(16, navigator.hardwareConcurrency || 1) : 1;
  const opts = [['', `auto (${self.crossOriginIsolated ? Math.max(1, Math.min(4, max)) : 1})`]];
  for (let n = 1; n <= max; n *= 2) opts.push([String(n), String(n)]);
  tsel.replaceChildren(...opts.map(([v, t]) => new Option(t, v, false, v === store.get('threads'))));
}

function bindEvents() {
  for (const id of ['camera', 'upload']) {
    $(id).addEventListener('change', (ev) => {
      const f = ev.target.files && ev.target.files[0];
      ev.target.value = ''; // choosing the same file again fires again
      if (f) identify(f);
    });
  }
  $('ask-server').addEventListener('click', askNow);
  $('install').addEventListener('click', async () => {
    if (!installPrompt) return;
    installPrompt.prompt();
    await installPrompt.userChoice;
    installPrompt = null;
    $('install').hidden = true;
  });
  $('precision').addEventListener('change', (ev) => {
    store.set(`precision.${mode.key}`, ev.target.value);
    session(mode, ev.target.value).catch((e) => showError(`The model could not be loaded: ${e.message}`));
  });
  $('settings-form').addEventListener('submit', (ev) => {
    ev.preventDefault();
    const url = $('server-url').value.trim();
    if (url && !/^https?:\/\/[^\s/?#]+/i.test(url)) { $('settings-status').textContent = 'The server must be an http(s) URL.'; return; }
    store.set('server', url === config.server ? '' : url);
    const token = $('server-token').value.trim();
    if (token) store.set('token', token);
    const threadsBefore = store.get('threads');
    store.set('threads', $('threads').value);
    renderSettings();
    $('ask-server').disabled = !(lastPhoto && serverUrl());
    $('settings-status').textContent = store.get('threads') !== threadsBefore
      ? 'Saved. Reload the app to use the new thread count.' : 'Saved on this phone.';
  });
  $('forget-token').addEventListener('click', () => {
    store.set('token', '');
    renderSettings();
    $('settings-status').textContent = 'Token removed from this phone.';
  });
}

// The browser offers installation once the manifest and service worker qualify; keep its prompt for our button.
let installPrompt = null;
window.addEventListener('beforeinstallprompt', (ev) => {
  ev.preventDefault();
  installPrompt = ev;
  $('install').hidden = false;
});
window.addEventListener('appinstalled', () => { $('install').hidden = true; installPrompt = null; });

async function registerServiceWorker() {
  const status = $('offline-status');
  if (!('serviceWorker' in navigator)) {
    status.textContent = 'Offline use: not available here (needs https or localhost)';
    return;
  }
  try {
    await navigator.serviceWorker.register('sw.js', { scope: './' });
    await navigator.serviceWorker.ready; // installed: the app and default models are cached
    status.textContent = 'Offline use: ready (app and models cached on this phone)';
    status.dataset.ready = 'true';
  } catch (e) {
    status.textContent = `Offline use: not available (${e.message})`;
  }
}

// Hooks for tests and the benchmark: the same code paths as a tap.
function b64ToBlob(b64, type = '') {
  const bin = atob(b64);
  const bytes = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
  return new Blob([bytes], { type });
}

async function bench(key, precision, photosB64, { warmup = 3 } = {}) {
  const m = config.modes.find((x) => x.key === key);
  const blobs = photosB64.map((b) => b64ToBlob(b));
  for (let i = 0; i < warmup; i++) await classify(blobs[i % blobs.length], m, precision);
  const rows = [];
  for (const b of blobs) rows.push((await classify(b, m, precision)).timings_ms);
  return { threads, isolated: self.crossOriginIsolated, rows };
}

async function main() {
  try {
    config = await (await fetch('config.json')).json();
  } catch (e) {
    $('loading').textContent = 'The app could not load its settings (config.json). Reload when online.';
    setState('error');
    return;
  }
  document.title = config.modes.length > 1 ? 'fieldid' : `fieldid ${config.modes[0].title}`;
  renderModes();
  renderSettings();
  bindEvents();
  $('runtime-status').textContent = `onnxruntime-web ${config.onnxruntime_web || ort.env.versions?.web || ''} · WebAssembly `
    + `${threads} thread${threads > 1 ? 's' : ''}${self.crossOriginIsolated ? '' : ' (page not cross-origin isolated)'}`
    + ` · build ${config.build_id}`;
  selectMode(params.get('mode') || store.get('mode') || config.modes[0].key);
  window.fieldid = {
    config, threads, isolated: self.crossOriginIsolated,
    classify: async (b64, key, precision) => classify(b64ToBlob(b64), config.modes.find((x) => x.key === key), precision),
    preprocess: async (b64, key) => Array.from((await preprocess(b64ToBlob(b64), config.modes.find((x) => x.key === key).preprocess,
      { maxPixels: config.max_pixels, maxBytes: config.max_file_bytes })).tensor),
    bench,
  };
  registerServiceWorker();
}

main();
