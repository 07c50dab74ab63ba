// The manifest's preprocessing in the browser, step for step what fieldid.export.phone.preprocess does
// in Python (Pillow + numpy), so the phone feeds the model the same numbers the export was verified on:
//   decode (EXIF orientation applied, no colour conversion) -> RGB
//   -> resize the shorter side to resize_size with Pillow's own resampling (antialiased, 8-bit fixed point)
//   -> centre crop (Python's round-half-even offsets) -> /255 -> (x - mean) / std in float32 -> NCHW.
// tests/test_app_browser.py holds this against the Python function on real photos.

/** Bad input the user can fix; `status` is the HTTP-style code the server would answer with. */
export class ImageInputError extends Error {
  constructor(message, status) { super(message); this.status = status; }
}

// Magic bytes of the formats of the intake policy. The browser decodes the first four; TIFF and
// HEIC/HEIF are accepted by the server but not decodable by most browsers.
export function sniffFormat(bytes) {
  const b = bytes;
  const ascii = (o, n) => String.fromCharCode(...b.subarray(o, o + n));
  if (b.length >= 3 && b[0] === 0xff && b[1] === 0xd8 && b[2] === 0xff) return 'JPEG';
  if (b.length >= 8 && ascii(1, 3) === 'PNG' && b[0] === 0x89) return 'PNG';
  if (b.length >= 12 && ascii(0, 4) === 'RIFF' && ascii(8, 4) === 'WEBP') return 'WEBP';
  if (b.length >= 2 && ascii(0, 2) === 'BM') return 'BMP';
  if (b.length >= 4 && (ascii(0, 4) === 'II*\0' || ascii(0, 4) === 'MM\0*')) return 'TIFF';
  if (b.length >= 12 && ascii(4, 4) === 'ftyp' && /^(heic|heix|hevc|hevx|heim|heis|mif1|msf1|avif)$/.test(ascii(8, 4))) {
    return ascii(8, 4) === 'avif' ? 'AVIF' : 'HEIF';
  }
  return '';
}
export const BROWSER_FORMATS = ['JPEG', 'PNG', 'WEBP', 'BMP'];

/** File/Blob -> {data: RGBA Uint8ClampedArray, width, height} with EXIF orientation applied. */
export async function decodeImage(blob, { maxPixels = 40_000_000, maxBytes = 30_000_000 } = {}) {
  if (!blob || blob.size === 0) throw new ImageInputError('No photo received. Take a photo or upload one.', 400);
  if (blob.size > maxBytes) {
    throw new ImageInputError(`That file is ${(blob.size / 1e6).toFixed(0)} MB; the limit is ${(maxBytes / 1e6).toFixed(0)} MB.`, 413);
  }
  const head = new Uint8Array(await blob.slice(0, 32).arrayBuffer());
  const format = sniffFormat(head);
  if (!BROWSER_FORMATS.includes(format)) {
    const err = new ImageInputError(format
      ? `This browser cannot read ${format} photos on the device.`
      : 'That file is not a photo this app can read. Use a JPEG, PNG or WEBP image.', 415);
    err.format = format;
    throw err;
  }
  let bmp;
  try {
    // 'from-image' applies the EXIF orientation (as Pillow's exif_transpose); no colour-space
    // conversion, because Pillow does none either.
    bmp = await createImageBitmap(blob, { imageOrientation: 'from-image', colorSpaceConversion: 'none',
      premultiplyAlpha: 'none' });
  } catch (e) {
    throw new ImageInputError('That file is not a photo this app can read. Use a JPEG, PNG or WEBP image.', 415);
  }
  const { width, height } = bmp;
  if (width * height > maxPixels) {
    bmp.close();
    throw new ImageInputError(`That photo is ${width}x${height} pixels; the limit is ${maxPixels}.`, 413);
  }
  const canvas = new OffscreenCanvas(width, height);
  const ctx = canvas.getContext('2d', { willReadFrequently: true });
  ctx.drawImage(bmp, 0, 0);
  bmp.close();
  return { data: ctx.getImageData(0, 0, width, height).data, width, height };
}

// ---- Pillow's resampling (libImaging/Resample.c), ported operation for operation ----
const PRECISION_BITS = 32 - 8 - 2;
const HALF = 1 << (PRECISION_BITS - 1);
const FILTERS = {
  bilinear: { support: 1.0, fn: (x) => { if (x < 0) x = -x; return x < 1 ? 1 - x : 0; } },
  bicubic: {
    support: 2.0,
    fn: (x) => {
      const a = -0.5;
      if (x < 0) x = -x;
      if (x < 1) return ((a + 2.0) * x - (a + 3.0)) * x * x + 1;
      if (x < 2) return (((x - 5) * x + 8) * x - 4) * a;
      return 0;
    },
  },
};

function precomputeCoeffs(inSize, outSize, filter) {
  const scale = inSize / outSize;
  const filterscale = scale < 1 ? 1 : scale;
  const support = filter.support * filterscale;
  const ksize = Math.ceil(support) * 2 + 1;
  const kk = new Float64Array(outSize * ksize);
  const bounds = new Int32Array(outSize * 2);
  const ss = 1.0 / filterscale;
  for (let xx = 0; xx < outSize; xx++) {
    const center = (xx + 0.5) * scale;
    let ww = 0;
    let xmin = Math.trunc(center - support + 0.5);
    if (xmin < 0) xmin = 0;
    let xmax = Math.trunc(center + support + 0.5);
    if (xmax > inSize) xmax = inSize;
    xmax -= xmin;
    const k = xx * ksize;
    for (let x = 0; x < xmax; x++) {
      const w = filter.fn((x + xmin - center + 0.5) * ss);
      kk[k + x] = w;
      ww += w;
    }
    for (let x = 0; x < xmax; x++) if (ww !== 0) kk[k + x] /= ww;
    bounds[xx * 2] = xmin;
    bounds[xx * 2 + 1] = xmax;
  }
  // normalize_coeffs_8bpc: coefficients as fixed-point integers, rounded away from zero.
  const ik = new Int32Array(kk.length);
  for (let i = 0; i < kk.length; i++) {
    ik[i] = kk[i] < 0 ? Math.trunc(-0.5 + kk[i] * (1 << PRECISION_BITS)) : Math.trunc(0.5 + kk[i] * (1 << PRECISION_BITS));
  }
  return { ksize, bounds, kk: ik };
}

const clip8 = (s) => { const v = s >> PRECISION_BITS; return v < 0 ? 0 : v > 255 ? 255 : v; };

function resampleHorizontal(src, srcW, rowFirst, rows, outW, c) {
  const out = new Uint8ClampedArray(outW * rows * 4);
  for (let yy = 0; yy < rows; yy++) {
    const rowIn = (yy + rowFirst) * srcW * 4;
    const rowOut = yy * outW * 4;
    for (let xx = 0; xx < outW; xx++) {
      const xmin = c.bounds[xx * 2], xmax = c.bounds[xx * 2 + 1], k = xx * c.ksize;
      let s0 = HALF, s1 = HALF, s2 = HALF;
      for (let x = 0; x < xmax; x++) {
        const p = rowIn + (x + xmin) * 4, w = c.kk[k + x];
        s0 += src[p] * w; s1 += src[p + 1] * w; s2 += src[p + 2] * w;
      }
      const o = rowOut + xx * 4;
      out[o] = clip8(s0); out[o + 1] = clip8(s1); out[o + 2] = clip8(s2); out[o + 3] = 255;
    }
  }
  return out;
}

function resampleVertical(src, w, outH, c, shift) {
  const out = new Uint8ClampedArray(w * outH * 4);
  for (let yy = 0; yy < outH; yy++) {
    const ymin = c.bounds[yy * 2] - shift, ymax = c.bounds[yy * 2 + 1], k = yy * c.ksize;
    for (let xx = 0; xx < w; xx++) {
      let s0 = HALF, s1 = HALF, s2 = HALF;
      for (let y = 0; y < ymax; y++) {
        const p = ((y + ymin) * w + xx) * 4, wt = c.kk[k + y];
        s0 += src[p] * wt; s1 += src[p + 1] * wt; s2 += src[p + 2] * wt;
      }
      const o = (yy * w + xx) * 4;
      out[o] = clip8(s0); out[o + 1] = clip8(s1); out[o + 2] = clip8(s2); out[o + 3] = 255;
    }
  }
  return out;
}

// Pillow's NEAREST resize is an affine scale (Geometry.c ImagingScaleAffine): positions accumulate.
function nearestIndex(inSize, outSize) {
  const a = inSize / outSize, idx = new Int32Array(outSize);
  let pos = a * 0.5;
  for (let i = 0; i < outSize; i++) {
    idx[i] = pos < 0 ? -1 : Math.trunc(pos);
    pos += a;
  }
  return idx;
}

function resizeNearest(img, outW, outH) {
  const xs = nearestIndex(img.width, outW), ys = nearestIndex(img.height, outH);
  const out = new Uint8ClampedArray(outW * outH * 4);
  for (let y = 0; y < outH; y++) {
    if (ys[y] < 0 || ys[y] >= img.height) continue;
    for (let x = 0; x < outW; x++) {
      if (xs[x] < 0 || xs[x] >= img.width) continue;
      const p = (ys[y] * img.width + xs[x]) * 4, o = (y * outW + x) * 4;
      out[o] = img.data[p]; out[o + 1] = img.data[p + 1]; out[o + 2] = img.data[p + 2]; out[o + 3] = 255;
    }
  }
  return { data: out, width: outW, height: outH };
}

/** Pillow's Image.resize((outW, outH), resample) for an RGB(A) image. */
export function resize(img, outW, outH, interpolation) {
  if (interpolation === 'nearest') return resizeNearest(img, outW, outH);
  const filter = FILTERS[interpolation];
  if (!filter) throw new Error(`interpolation ${interpolation} is not supported`);
  const needH = outW !== img.width, needV = outH !== img.height;
  const ch = precomputeCoeffs(img.width, outW, filter), cv = precomputeCoeffs(img.height, outH, filter);
  let data = img.data, w = img.width, shift = 0;
  if (needH) {
    // Only the rows the vertical pass will read (Pillow's ybox_first..ybox_last).
    const first = needV ? cv.bounds[0] : 0;
    const last = needV ? cv.bounds[outH * 2 - 2] + cv.bounds[outH * 2 - 1] : img.height;
    data = resampleHorizontal(data, w, first, last - first, outW, ch);
    w = outW;
    shift = first;
  }
  if (needV) data = resampleVertical(data, w, outH, cv, shift);
  return { data, width: w, height: outH };
}

/** The shorter side -> size, the longer one scaled and truncated (fieldid.export.phone._resize_shorter). */
export function resizedSize(w, h, size) {
  const short = Math.min(w, h), long = Math.max(w, h);
  const newLong = Math.trunc(size * long / short);
  return w <= h ? [size, newLong] : [newLong, size];
}

/** Refuse an image whose resized copy would exceed the pixel limit (phone.check_resize_fits). */
export function checkResizeFits(w, h, size, maxPixels) {
  if (size * Math.ceil(size * Math.max(w, h) / Math.min(w, h)) > maxPixels) {
    throw new ImageInputError(`That photo is ${w}x${h}: too elongated to use.`, 413);
  }
}

// Python's round(): halves go to the even neighbour (torchvision's centre crop uses it).
function roundHalfEven(v) {
  const f = Math.floor(v), d = v - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

/** Decoded RGBA image -> Float32Array (1, 3, crop, crop) as the manifest prescribes. */
export function toTensor(img, spec) {
  const [nw, nh] = resizedSize(img.width, img.height, spec.resize_size);
  const r = nw === img.width && nh === img.height ? img : resize(img, nw, nh, spec.interpolation);
  const c = spec.crop_size, hw = c * c;
  const top = roundHalfEven((r.height - c) / 2), left = roundHalfEven((r.width - c) / 2);
  const mean = spec.mean.map(Math.fround), std = spec.std.map(Math.fround), f255 = Math.fround(255);
  const out = new Float32Array(3 * hw);
  for (let y = 0; y < c; y++) {
    const sy = y + top;
    for (let x = 0; x < c; x++) {
      const sx = x + left;
      const inside = sy >= 0 && sy < r.height && sx >= 0 && sx < r.width;  // Pillow's crop pads with black
      const p = (sy * r.width + sx) * 4;
      for (let ch = 0; ch < 3; ch++) {
        const v = inside ? r.data[p + ch] : 0;
        // float32 at every step, like numpy's float32 arrays
        out[ch * hw + y * c + x] = Math.fround(Math.fround(Math.fround(v / f255) - mean[ch]) / std[ch]);
      }
    }
  }
  return out;
}

/** File/Blob -> {tensor, width, height, decodeMs, preprocessMs}. Throws ImageInputError for bad input. */
export async function preprocess(blob, spec, limits = {}) {
  const t0 = performance.now();
  const img = await decodeImage(blob, limits);
  checkResizeFits(img.width, img.height, spec.resize_size, limits.maxPixels ?? 40_000_000);
  const t1 = performance.now();
  const tensor = toTensor(img, spec);
  const t2 = performance.now();
  return { tensor, width: img.width, height: img.height, decodeMs: t1 - t0, preprocessMs: t2 - t1 };
}
