// usage: node screenshot.js URL out.png [waitms]  (headless Chromium via playwright-core; closes the MLflow assistant panel,
// lists every picture of every frame with its loaded size, and failed requests). Set-up: mlflow/README.md
const { chromium } = require('playwright-core');
(async () => {
  const [url, out, waitms = '6000'] = process.argv.slice(2);
  const b = await chromium.launch({ executablePath: '/usr/bin/chromium', args: ['--no-sandbox','--disable-gpu','--disable-quic','--no-first-run','--disable-background-networking','--disable-component-update','--disable-sync'] });
  const p = await b.newPage({ viewport: { width: 1400, height: 900 } });
  const failed = [];
  p.on('requestfailed', r => failed.push('FAILED ' + r.url().slice(0,200) + ' ' + (r.failure() || {}).errorText));
  p.on('response', r => { if (r.status() >= 400 && !r.url().includes('users/current')) failed.push('HTTP ' + r.status() + ' ' + r.url().slice(0,200)); });
  p.on('console', m => { if (m.type() === 'error' && !m.text().includes('404 (Not Found)')) failed.push('CONSOLE ' + m.text().slice(0, 300)); });
  await p.goto(url, { waitUntil: 'load', timeout: 60000 });
  await p.waitForTimeout(+waitms);
  await p.getByRole('button', { name: 'Close', exact: true }).click({ timeout: 2000 }).catch(() => console.log('(no assistant close button)'));
  await p.waitForTimeout(2500);
  await p.screenshot({ path: out });
  console.log('title:', await p.title(), '| url:', p.url());
  for (const f of p.frames()) {
    console.log('frame:', f.url().slice(0, 200));
    const imgs = await f.locator('img').evaluateAll(es => es.map(e => `${e.getAttribute('src')} -> complete=${e.complete} natural=${e.naturalWidth}x${e.naturalHeight} resolved=${e.src.slice(0,160)}`)).catch(() => []);
    imgs.slice(0, 30).forEach(x => console.log('  img', x));
  }
  failed.forEach(x => console.log(x));
  await b.close();
})();
