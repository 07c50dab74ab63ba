// Offline support: on the first visit cache the app, onnxruntime-web and each mode's default model
// (config.json's "precache" list); afterwards serve every same-origin GET from the cache first.
// The cache is named after the build id, which fieldid app build writes in below: a new build is a
// new sw.js, so the phone fetches the new files once and drops the old cache.
const BUILD_ID = '__BUILD_ID__';
const CACHE = `fieldid-app-${BUILD_ID}`;

// Cross-origin isolation (WebAssembly threads) also on static hosts that cannot send these headers:
// the responses this worker hands to the page carry them.
const ISOLATION = {
  'Cross-Origin-Opener-Policy': 'same-origin',
  'Cross-Origin-Embedder-Policy': 'require-corp',
  'Cross-Origin-Resource-Policy': 'same-origin',
};

function isolated(resp) {
  if (!resp || resp.type !== 'basic' || resp.status < 200 || resp.status >= 300) return resp;
  const headers = new Headers(resp.headers);
  for (const [k, v] of Object.entries(ISOLATION)) headers.set(k, v);
  return new Response(resp.body, { status: resp.status, statusText: resp.statusText, headers });
}

self.addEventListener('install', (event) => {
  event.waitUntil((async () => {
    const cfg = await (await fetch('config.json', { cache: 'no-store' })).json();
    const cache = await caches.open(CACHE);
    // cache: 'reload' skips the HTTP cache, so the offline copy is this build's, not an older one.
    await cache.addAll(cfg.precache.map((u) => new Request(u, { cache: 'reload' })));
    await self.skipWaiting();
  })());
});

self.addEventListener('activate', (event) => {
  event.waitUntil((async () => {
    for (const key of await caches.keys()) {
      if (key.startsWith('fieldid-app-') && key !== CACHE) await caches.delete(key);
    }
    await self.clients.claim();
  })());
});

self.addEventListener('fetch', (event) => {
  const req = event.request;
  const url = new URL(req.url);
  // The server fallback (another origin, POST) always goes to the network.
  if (req.method !== 'GET' || url.origin !== self.location.origin) return;
  event.respondWith((async () => {
    const cache = await caches.open(CACHE);
    const hit = await cache.match(req, { ignoreSearch: true });
    if (hit) return isolated(hit);
    const resp = await fetch(req);
    // Files not precached (the other precision's model) are kept once fetched.
    if (resp.ok && resp.type === 'basic') await cache.put(req, resp.clone());
    return isolated(resp);
  })());
});

self.addEventListener('message', (event) => {
  if (event.data === 'build-id') event.source.postMessage({ buildId: BUILD_ID });
});
