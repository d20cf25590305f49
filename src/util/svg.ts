// Small self-contained SVG plots: line charts (loss curves) and heatmaps (layer x expert load). No dependencies,
// so they render anywhere a browser or an image viewer does.

const esc = (s: string) => s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;');
const fmt = (v: number) => (Math.abs(v) >= 100 ? v.toFixed(0) : Math.abs(v) >= 1 ? v.toFixed(2) : v.toPrecision(2));

export interface Series {
  name: string;
  points: readonly (readonly [number, number])[];
  color?: string;
}

const PALETTE = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd', '#8c564b', '#e377c2', '#17becf'];

/** A line chart of several series over a shared x axis. */
export function lineChartSVG(series: readonly Series[], opts: { title: string; xLabel: string; yLabel: string; width?: number; height?: number }): string {
  const W = opts.width ?? 720;
  const H = opts.height ?? 420;
  const m = { l: 64, r: 150, t: 36, b: 48 };
  const pts = series.flatMap((s) => s.points).filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
  const x0 = Math.min(...pts.map((p) => p[0]), 0);
  const x1 = Math.max(...pts.map((p) => p[0]), x0 + 1);
  let y0 = Math.min(...pts.map((p) => p[1]));
  let y1 = Math.max(...pts.map((p) => p[1]));
  if (!Number.isFinite(y0)) [y0, y1] = [0, 1];
  if (y1 - y0 < 1e-9) [y0, y1] = [y0 - 0.5, y1 + 0.5];
  const pad = (y1 - y0) * 0.05;
  y0 -= pad;
  y1 += pad;
  const sx = (x: number) => m.l + ((x - x0) / (x1 - x0)) * (W - m.l - m.r);
  const sy = (y: number) => H - m.b - ((y - y0) / (y1 - y0)) * (H - m.t - m.b);
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="12">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${W / 2 - m.r / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">${esc(opts.title)}</text>`,
  ];
  for (let i = 0; i <= 5; i++) {
    const y = y0 + ((y1 - y0) * i) / 5;
    const x = x0 + ((x1 - x0) * i) / 5;
    out.push(`<line x1="${m.l}" x2="${W - m.r}" y1="${sy(y).toFixed(1)}" y2="${sy(y).toFixed(1)}" stroke="#eee"/>`);
    out.push(`<text x="${m.l - 6}" y="${(sy(y) + 4).toFixed(1)}" text-anchor="end">${fmt(y)}</text>`);
    out.push(`<text x="${sx(x).toFixed(1)}" y="${H - m.b + 18}" text-anchor="middle">${fmt(x)}</text>`);
  }
  out.push(`<rect x="${m.l}" y="${m.t}" width="${W - m.l - m.r}" height="${H - m.t - m.b}" fill="none" stroke="#999"/>`);
  out.push(`<text x="${(m.l + W - m.r) / 2}" y="${H - 10}" text-anchor="middle">${esc(opts.xLabel)}</text>`);
  out.push(`<text transform="translate(16 ${(m.t + H - m.b) / 2}) rotate(-90)" text-anchor="middle">${esc(opts.yLabel)}</text>`);
  series.forEach((s, i) => {
    const color = s.color ?? PALETTE[i % PALETTE.length];
    const good = s.points.filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y));
    if (good.length > 0) {
      const d = good.map(([x, y], j) => `${j ? 'L' : 'M'}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join('');
      out.push(`<path d="${d}" fill="none" stroke="${color}" stroke-width="1.6"/>`);
      if (good.length < 40) for (const [x, y] of good) out.push(`<circle cx="${sx(x).toFixed(1)}" cy="${sy(y).toFixed(1)}" r="2.5" fill="${color}"/>`);
    }
    out.push(`<rect x="${W - m.r + 12}" y="${m.t + 8 + i * 20}" width="14" height="3" fill="${color}"/>`);
    out.push(`<text x="${W - m.r + 32}" y="${m.t + 13 + i * 20}">${esc(s.name)}</text>`);
  });
  out.push('</svg>');
  return out.join('\n') + '\n';
}

/** A heatmap of a matrix (rows x columns), cells labelled with their values. */
export function heatmapSVG(matrix: readonly (readonly number[])[], opts: { title: string; rowLabel: (i: number) => string; colLabel: (j: number) => string; format?: (v: number) => string }): string {
  const rows = matrix.length;
  const cols = rows ? matrix[0].length : 0;
  const cw = 56;
  const ch = 28;
  const m = { l: 70, t: 56 };
  const W = m.l + cols * cw + 20;
  const H = m.t + rows * ch + 20;
  const all = matrix.flat().filter(Number.isFinite);
  const lo = Math.min(...all, 0);
  const hi = Math.max(...all, lo + 1e-12);
  const format = opts.format ?? fmt;
  const out: string[] = [
    `<svg xmlns="http://www.w3.org/2000/svg" width="${W}" height="${H}" viewBox="0 0 ${W} ${H}" font-family="sans-serif" font-size="11">`,
    `<rect width="${W}" height="${H}" fill="white"/>`,
    `<text x="${W / 2}" y="20" text-anchor="middle" font-size="14" font-weight="bold">${esc(opts.title)}</text>`,
  ];
  for (let j = 0; j < cols; j++) out.push(`<text x="${m.l + j * cw + cw / 2}" y="${m.t - 8}" text-anchor="middle">${esc(opts.colLabel(j))}</text>`);
  for (let i = 0; i < rows; i++) {
    out.push(`<text x="${m.l - 8}" y="${m.t + i * ch + ch / 2 + 4}" text-anchor="end">${esc(opts.rowLabel(i))}</text>`);
    for (let j = 0; j < cols; j++) {
      const v = matrix[i][j];
      const a = (v - lo) / (hi - lo);
      // White to dark blue.
      const r = Math.round(255 - a * 215);
      const g = Math.round(255 - a * 160);
      const b = Math.round(255 - a * 60);
      out.push(`<rect x="${m.l + j * cw}" y="${m.t + i * ch}" width="${cw - 1}" height="${ch - 1}" fill="rgb(${r},${g},${b})"/>`);
      out.push(`<text x="${m.l + j * cw + cw / 2}" y="${m.t + i * ch + ch / 2 + 4}" text-anchor="middle" fill="${a > 0.55 ? 'white' : 'black'}">${esc(format(v))}</text>`);
    }
  }
  out.push('</svg>');
  return out.join('\n') + '\n';
}
