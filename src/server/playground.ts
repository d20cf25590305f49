// The web playground served at "/": chat with streaming; each token coloured by the experts that produced it
// (hover for the per-layer choices); a live layer x expert load heatmap from /v1/stats. One self-contained page.

export const PLAYGROUND_HTML = `<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>moe-ts playground</title>
<style>
  :root { --bg:#0f1115; --panel:#171a21; --text:#e6e6e6; --muted:#8a93a6; --accent:#6ea8fe; }
  * { box-sizing: border-box; }
  body { margin:0; font:15px/1.5 system-ui, sans-serif; background:var(--bg); color:var(--text); display:grid; grid-template-columns: 1fr 380px; height:100vh; }
  main { display:flex; flex-direction:column; min-width:0; }
  header { padding:12px 16px; border-bottom:1px solid #262b36; display:flex; gap:12px; align-items:center; }
  header h1 { font-size:16px; margin:0; }
  header .muted { color:var(--muted); font-size:13px; }
  #log { flex:1; overflow:auto; padding:16px; }
  .msg { margin:0 0 14px; padding:10px 12px; border-radius:8px; background:var(--panel); white-space:pre-wrap; word-break:break-word; }
  .msg.user { background:#1e2a3d; }
  .msg .who { font-size:12px; color:var(--muted); margin-bottom:4px; }
  .tok { border-radius:3px; padding:0 1px; cursor:default; }
  form { display:flex; gap:8px; padding:12px 16px; border-top:1px solid #262b36; }
  textarea { flex:1; resize:none; height:56px; background:var(--panel); color:var(--text); border:1px solid #2c3340; border-radius:8px; padding:8px; font:inherit; }
  button { background:var(--accent); color:#0b1020; border:0; border-radius:8px; padding:0 18px; font-weight:600; cursor:pointer; }
  button:disabled { opacity:.5; cursor:default; }
  aside { border-left:1px solid #262b36; padding:12px 16px; overflow:auto; }
  aside h2 { font-size:14px; margin:4px 0 8px; }
  #heat { border-collapse:collapse; font-size:11px; }
  #heat td, #heat th { width:34px; height:22px; text-align:center; padding:0; }
  #heat th { color:var(--muted); font-weight:normal; }
  #legend { display:flex; flex-wrap:wrap; gap:4px; margin:8px 0 12px; font-size:12px; }
  #legend span { padding:1px 6px; border-radius:3px; color:#0b1020; }
  #tip { position:fixed; pointer-events:none; background:#000c; color:#fff; font:12px/1.4 ui-monospace, monospace; padding:6px 8px; border-radius:6px; display:none; white-space:pre; z-index:10; }
  label { font-size:12px; color:var(--muted); }
  input { background:var(--panel); color:var(--text); border:1px solid #2c3340; border-radius:6px; padding:2px 6px; width:70px; }
</style>
</head>
<body>
<main>
  <header><h1>moe-ts playground</h1><span class="muted" id="model">loading...</span>
    <label>temperature <input id="temp" type="number" value="0.7" min="0" max="2" step="0.1"></label>
    <label>max tokens <input id="maxtok" type="number" value="64" min="1" max="4096"></label>
    <label>API key <input id="key" type="password" style="width:110px"></label>
  </header>
  <div id="log"></div>
  <form id="form"><textarea id="input" placeholder="Say something... (Enter sends, Shift+Enter for a new line)"></textarea><button id="send">Send</button></form>
</main>
<aside>
  <h2>Token colour = the expert with the highest weight in the last layer</h2>
  <div id="legend"></div>
  <h2>Expert load (token-slots routed, all requests)</h2>
  <table id="heat"></table>
  <p class="muted" id="stats" style="color:var(--muted);font-size:12px"></p>
</aside>
<div id="tip"></div>
<script>
const $ = (id) => document.getElementById(id);
const history = [];
let nExperts = 8, nLayers = 0;
const colour = (e, n) => 'hsl(' + Math.round((360 * e) / n) + ' 70% 62%)';
function headers() {
  const h = { 'content-type': 'application/json' };
  if ($('key').value) h.authorization = 'Bearer ' + $('key').value;
  return h;
}
async function loadModel() {
  try {
    const r = await fetch('/v1/models', { headers: headers() });
    const j = await r.json();
    const m = j.data[0];
    nExperts = m.config.numLocalExperts; nLayers = m.config.numHiddenLayers;
    $('model').textContent = m.id + ' - ' + nLayers + ' layers, ' + nExperts + ' experts, top-' + m.config.numExpertsPerTok + ', context ' + m.context_length;
    $('legend').innerHTML = Array.from({ length: nExperts }, (_, e) => '<span style="background:' + colour(e, nExperts) + '">expert ' + e + '</span>').join('');
  } catch (e) { $('model').textContent = 'cannot reach the server: ' + e; }
}
function addMsg(who, cls) {
  const d = document.createElement('div');
  d.className = 'msg ' + cls;
  d.innerHTML = '<div class="who"></div><div class="body"></div>';
  d.querySelector('.who').textContent = who;
  $('log').appendChild(d);
  return d.querySelector('.body');
}
function tokenSpan(text, router) {
  const s = document.createElement('span');
  s.className = 'tok';
  s.textContent = text;
  if (router && router.experts) {
    const last = router.experts[router.experts.length - 1], w = router.weights[router.weights.length - 1];
    let best = 0; for (let i = 1; i < last.length; i++) if (w[i] > w[best]) best = i;
    s.style.background = colour(last[best], nExperts).replace('62%)', '62% / 0.45)');
    s.dataset.tip = 'token ' + router.token + ' ' + JSON.stringify(text) + '\\n' + router.experts.map((ex, l) =>
      'layer ' + l + ': ' + ex.map((e, i) => 'E' + e + ' ' + router.weights[l][i].toFixed(2)).join('  ')).join('\\n');
  }
  return s;
}
document.addEventListener('mousemove', (ev) => {
  const t = ev.target.closest && ev.target.closest('.tok');
  const tip = $('tip');
  if (t && t.dataset.tip) { tip.textContent = t.dataset.tip; tip.style.display = 'block'; tip.style.left = ev.clientX + 12 + 'px'; tip.style.top = ev.clientY + 12 + 'px'; }
  else tip.style.display = 'none';
});
async function send(text) {
  history.push({ role: 'user', content: text });
  addMsg('you', 'user').textContent = text;
  const out = addMsg('model', 'bot');
  $('send').disabled = true;
  let answer = '';
  try {
    const r = await fetch('/v1/chat/completions', { method: 'POST', headers: headers(), body: JSON.stringify({
      messages: history, stream: true, moe_router: true, temperature: Number($('temp').value), max_tokens: Number($('maxtok').value) }) });
    if (!r.ok) { const j = await r.json(); throw new Error(j.error ? j.error.message : r.statusText); }
    const reader = r.body.getReader(); const dec = new TextDecoder(); let buf = '';
    for (;;) {
      const { value, done } = await reader.read(); if (done) break;
      buf += dec.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf('\\n\\n')) >= 0) {
        const line = buf.slice(0, i).trim(); buf = buf.slice(i + 2);
        if (!line.startsWith('data:')) continue;
        const data = line.slice(5).trim(); if (data === '[DONE]') continue;
        const j = JSON.parse(data);
        if (j.error) throw new Error(j.error.message);
        const c = j.choices && j.choices[0]; if (!c) continue;
        const piece = c.delta && c.delta.content ? c.delta.content : '';
        if (c.moe_router || piece) {
          const shown = answer === '' ? piece.replace(/^ /, '') : piece;
          answer += piece;
          out.appendChild(tokenSpan(shown, c.moe_router));
          $('log').scrollTop = $('log').scrollHeight;
        }
      }
    }
    history.push({ role: 'assistant', content: answer.replace(/^ /, '') });
  } catch (e) { out.appendChild(document.createTextNode('[error: ' + e.message + ']')); history.pop(); }
  $('send').disabled = false;
  refreshStats();
}
async function refreshStats() {
  try {
    const r = await fetch('/v1/stats', { headers: headers() }); if (!r.ok) return;
    const s = await r.json();
    let max = 1; for (const row of s.load) for (const v of row) max = Math.max(max, v);
    let html = '<tr><th></th>' + s.load[0].map((_, e) => '<th>E' + e + '</th>').join('') + '</tr>';
    s.load.forEach((row, l) => {
      html += '<tr><th>L' + l + '</th>' + row.map((v) => {
        const a = v / max;
        return '<td title="layer ' + l + ': ' + v + '" style="background:rgba(110,168,254,' + a.toFixed(3) + ');color:' + (a > 0.5 ? '#0b1020' : '#e6e6e6') + '">' + v + '</td>';
      }).join('') + '</tr>';
    });
    $('heat').innerHTML = html;
    $('stats').textContent = s.tokens + ' tokens processed in ' + s.steps + ' batched steps; ' + s.running + ' running, ' + s.queued + ' queued';
  } catch (e) {}
}
$('form').addEventListener('submit', (e) => { e.preventDefault(); const t = $('input').value.trim(); if (!t) return; $('input').value = ''; send(t); });
$('input').addEventListener('keydown', (e) => { if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); $('form').requestSubmit(); } });
loadModel().then(refreshStats);
setInterval(refreshStats, 2000);
</script>
</body>
</html>
`;
