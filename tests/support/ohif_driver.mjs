// Drive the OHIF viewer in Debian's headless Chromium (playwright-core, no bundled browser) and
// screenshot one slice of a DICOM SEG overlay: with every segment, with each segment alone, without.
//
// Usage: node ohif_driver.mjs '<json>' with keys url, studyInstanceUID, segSeriesInstanceUID,
// targetSOPInstanceUID, outDir, chromium, cacheDir (holds node_modules/playwright-core), timeoutMs.
// Writes outDir/with-seg.png, without-seg.png, segment-<n>.png, page.png and report.json. The
// screenshots are clipped to the viewport's canvas; report.corners gives, in those screenshot pixels,
// where the centres of the shown image's corner pixels are (cornerstone's worldToCanvas of the image
// plane), so the caller can project the SEG's own mask onto the screenshot and compare pixels.
// Exit status 0 with report.json, or non-zero with a message on stderr (screenshots so far in outDir).

import { createRequire } from 'node:module';
import fs from 'node:fs';
import path from 'node:path';

const args = JSON.parse(process.argv[2]);
const require = createRequire(path.join(args.cacheDir, 'package.json'));
const { chromium } = require('playwright-core');

// Flags from docs/notes: no GPU, no background network, software WebGL for cornerstone.
const CHROMIUM_FLAGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--enable-unsafe-swiftshader',
];
const deadline = Date.now() + args.timeoutMs;
const remaining = () => Math.max(1000, deadline - Date.now());
const report = { consoleErrors: [], failedRequests: [], httpErrors: [], segPrefetchWarnings: [], steps: [] };
let page = null;
const step = (name, extra = {}) => {
  report.steps.push({ name, t: Date.now(), ...extra });
  process.stdout.write(`ohif-driver: ${name}\n`);
};

function writeReport() {
  fs.writeFileSync(path.join(args.outDir, 'report.json'), JSON.stringify(report, null, 2));
}

// In-page: the one stack viewport OHIF opened, and the SEG's segmentation shown on it.
const viewerState = () => {
  const cs = window.cornerstone;
  const tools = window.cornerstoneTools;
  if (!cs || !tools) return { ready: false, why: 'cornerstone not initialised' };
  const vp = window.ainodeStackViewport();
  if (!vp) return { ready: false, why: 'no stack viewport with images' };
  const reps = tools.segmentation.state.getSegmentationRepresentations(vp.id) || [];
  const rep = reps.find((r) => r.type === 'Labelmap');
  const loadingText = /Loading SEG/i.test(document.body.innerText);
  const imageData = vp.getImageData && vp.getImageData();
  if (!rep || loadingText || !imageData) {
    return { ready: false, why: rep ? (loadingText ? 'Loading SEG' : 'image not rendered') : 'no SEG labelmap on the viewport' };
  }
  const segmentation = tools.segmentation.state.getSegmentation(rep.segmentationId);
  return {
    ready: true,
    viewportId: vp.id,
    segmentationId: rep.segmentationId,
    segmentationLabel: segmentation.label,
    segments: Object.values(segmentation.segments).map((s) => ({ segmentIndex: s.segmentIndex, label: s.label })),
    imageIndex: vp.getCurrentImageIdIndex(),
    imageIds: vp.getImageIds(),
  };
};

// In-page: does the viewport's vtk renderer draw exactly the image actors cornerstone keeps for it?
// OHIF 3.13.2 (cornerstone3D) loses that race in about half the sessions on this machine when it opens
// straight onto a SEG: the renderer keeps an orphaned actor holding the first image shown, never updated
// again, and cornerstone's own stack actor is not drawn at all. The SEG overlay and the "I:" label then
// follow the scroll while the CT pixels stay on the first image, which would also mislead a reader.
// Measured: present in 4 of 8 sessions right after the SEG appeared, the same ones whose screenshots
// showed the first image, and never appearing later in a session that started clean.
const actorMismatch = () => {
  const vp = window.ainodeStackViewport();
  if (!vp || typeof vp.getRenderer !== 'function') return null;
  const known = (vp.getActors() || []).map((a) => a.actor);
  const drawn = vp.getRenderer().getViewProps();
  const orphaned = drawn.filter((p) => !known.includes(p)).length;
  const notDrawn = known.filter((a) => !drawn.includes(a)).length;
  return orphaned || notDrawn ? { orphaned, notDrawn } : null;
};

// Viewer sessions the driver may open (a fresh browser context each) while it shows the actor race above.
const MAX_VIEWER_SESSIONS = 12;

async function waitReady(page) {
  let last = null;
  while (Date.now() < deadline) {
    if (report.segLoadFailure) {
      const details = [...report.segPrefetchWarnings.slice(0, 1), ...report.httpErrors.slice(0, 2)].join('\n  ');
      throw new Error(`OHIF could not load the SEG: ${report.segLoadFailure}\n  ${details}`);
    }
    last = await page.evaluate(viewerState);
    if (last.ready) return last;
    await page.waitForTimeout(250);
  }
  throw new Error(`SEG not shown before the timeout: ${last && last.why}`);
}

const currentIndex = (page) =>
  page.evaluate(() => {
    return window.ainodeStackViewport().getCurrentImageIdIndex();
  });

async function waitIndexSettled(page, index) {
  let current = await currentIndex(page);
  for (let t = 0; t < 80; t++) {
    await page.waitForTimeout(40);
    const next = await currentIndex(page);
    if (next === current && next !== index) return next;
    current = next;
  }
  return current;
}

// The viewport's index moves at once, but its image loads and renders later: until then the canvas
// still shows the previous image under the new slice's SEG overlay. Wait until the image the viewport
// holds is the current one, then ask for one render.
async function waitImageRendered(page) {
  for (let t = 0; t < 150 && Date.now() < deadline; t++) {
    const state = await page.evaluate(() => {
      const vp = window.ainodeStackViewport();
      const image = vp.csImage || (typeof vp.getCornerstoneImage === 'function' ? vp.getCornerstoneImage() : null);
      if (!image || !image.imageId) return 'unknown';
      if (image.imageId !== vp.getCurrentImageId()) return 'loading';
      vp.render();
      return 'rendered';
    });
    if (state !== 'loading') {
      await page.waitForTimeout(state === 'rendered' ? 500 : 2000);
      return state;
    }
    await page.waitForTimeout(200);
  }
  return 'timeout';
}

// Mouse wheel over the viewport until the target image is shown. OHIF moves one image per notch;
// which way is "down" is configurable, so one notch first learns the direction, then up to 8 notches
// per burst.
async function scrollTo(page, box, target) {
  await page.mouse.move(box.x + box.width / 2, box.y + box.height / 2);
  let notches = 0;
  let direction = 1;
  let index = await currentIndex(page);
  if (index !== target) {
    await page.mouse.wheel(0, 100 * Math.sign(target - index));
    notches += 1;
    const moved = await waitIndexSettled(page, index);
    if (Math.abs(target - moved) > Math.abs(target - index)) direction = -1;
    index = moved;
  }
  for (let burst = 0; burst < 100 && index !== target && Date.now() < deadline; burst++) {
    const count = Math.min(8, Math.abs(target - index));
    for (let i = 0; i < count; i++) {
      await page.mouse.wheel(0, 100 * Math.sign(target - index) * direction);
      await page.waitForTimeout(30);
    }
    notches += count;
    index = await waitIndexSettled(page, index);
  }
  if (index !== target) throw new Error(`could not scroll to image index ${target} (at ${index})`);
  return notches;
}

// Two identical consecutive screenshots: rendering (and any fade) is done. `changedFrom` is the
// screenshot before the change just requested (a segment shown or hidden): until the viewport differs
// from it, the change has not been rendered yet. On a loaded machine the render can lag the request by
// more than one polling interval, and two identical stale screenshots would pass as "stable".
async function stableShot(page, clip, file, changedFrom = null) {
  let previous = null;
  for (let i = 0; i < 40; i++) {
    await page.waitForTimeout(i === 0 ? 300 : 400);
    const shot = await page.screenshot({ clip });
    const changed = !changedFrom || !shot.equals(changedFrom);
    if (previous && changed && shot.equals(previous)) {
      fs.writeFileSync(file, shot);
      return shot;
    }
    previous = shot;
  }
  fs.writeFileSync(file, previous);
  report.steps.push({ name: `screenshot not stable: ${path.basename(file)}` });
  return previous;
}

// A fresh browser context (own cache and storage) with the viewer page and the report's listeners.
async function openContext(browser) {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, deviceScaleFactor: 1 });
  // The first-visit tour would cover the viewport.
  await context.addInitScript(() => localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])));
  // In-page: the one stack viewport OHIF opened (the viewport with images), for every evaluate below.
  await context.addInitScript(() => {
    window.ainodeStackViewport = () => window.cornerstone.getRenderingEngines().flatMap((e) => e.getViewports())
      .find((v) => typeof v.getImageIds === 'function' && v.getImageIds().length);
  });
  const newPage = await context.newPage();
  newPage.setDefaultTimeout(remaining());
  newPage.on('console', (m) => {
    const text = m.text();
    if (m.type() === 'error') report.consoleErrors.push(text.slice(0, 300));
    // OHIF logs a SEG it gave up on as a warning and leaves the viewport without it.
    if (/Segmentation .* failed to load/.test(text)) report.segLoadFailure = text.slice(0, 300);
    if (/prefetchInstanceFrames/.test(text)) report.segPrefetchWarnings.push(text.split('\n')[0].slice(0, 300));
  });
  newPage.on('requestfailed', (r) => report.failedRequests.push(`${r.url().slice(0, 200)} ${r.failure()?.errorText}`));
  newPage.on('response', (r) => r.status() >= 400 && report.httpErrors.push(`${r.status()} ${r.url().slice(0, 300)}`));
  return { context, page: newPage };
}

async function main() {
  fs.mkdirSync(args.outDir, { recursive: true });
  const browser = await chromium.launch({
    executablePath: args.chromium,
    headless: true,
    args: CHROMIUM_FLAGS,
    timeout: 60000,
  });
  try {
    const query = new URLSearchParams({
      StudyInstanceUIDs: args.studyInstanceUID,
      initialSeriesInstanceUID: args.segSeriesInstanceUID,
    });
    report.viewerUrl = `${args.url}/viewer?${query}`;
    // A reader who saw the CT stuck would open the viewer again; so does the driver, in a fresh browser
    // context, and says so in the report. Measured: page reloads in the same context hit the race again
    // and again (5 and 6 times in a row); fresh contexts 12 times in 22 sessions, at most 3 in a row.
    let state = null;
    let context = null;
    report.viewerRaces = [];
    for (let session = 1; ; session++) {
      step('open viewer', { session });
      if (context) await context.close();
      ({ context, page } = await openContext(browser));
      await page.goto(report.viewerUrl, { timeout: remaining() });
      state = await waitReady(page);
      await page.waitForTimeout(1000); // let the SEG hydration settle before judging the actors
      const mismatch = await page.evaluate(actorMismatch);
      if (!mismatch) break;
      report.viewerRaces.push({ session, ...mismatch });
      step('viewer actor race: opening again', { session, ...mismatch });
      if (session >= MAX_VIEWER_SESSIONS) {
        throw new Error(`OHIF kept a stale image actor in all ${session} sessions: ${JSON.stringify(report.viewerRaces)}`);
      }
    }
    step('SEG shown', { imageIndex: state.imageIndex, segments: state.segments });
    Object.assign(report, {
      segmentationLabel: state.segmentationLabel,
      segments: state.segments,
      initialImageIndex: state.imageIndex,
      numberOfImages: state.imageIds.length,
    });
    await page.screenshot({ path: path.join(args.outDir, 'page-initial.png') });

    const target = state.imageIds.findIndex((id) => id.includes(`/instances/${args.targetSOPInstanceUID}/`));
    if (target < 0) throw new Error(`target SOP Instance ${args.targetSOPInstanceUID} is not in the viewport's stack`);
    const canvas = await page.locator('.cornerstone-canvas').first().boundingBox();
    report.wheelNotches = await scrollTo(page, canvas, target);
    const rendered = await waitImageRendered(page);
    step('scrolled', { imageIndex: target, notches: report.wheelNotches, image: rendered });
    const lateMismatch = await page.evaluate(actorMismatch);
    if (lateMismatch) throw new Error(`OHIF image actors fell apart after the scroll: ${JSON.stringify(lateMismatch)}`);
    // Park the pointer outside the viewport: hover would highlight a segment or show a cursor.
    await page.mouse.move(5, 895);

    const shown = await page.evaluate(() => {
      const cs = window.cornerstone;
      const vp = window.ainodeStackViewport();
      const imageId = vp.getCurrentImageId();
      const plane = cs.metaData.get('imagePlaneModule', imageId);
      // Centre of pixel (column c, row r): IPP + c * column spacing * row cosines + r * row spacing * column cosines.
      const world = (c, r) => [0, 1, 2].map((k) =>
        plane.imagePositionPatient[k] +
        c * plane.columnPixelSpacing * plane.rowCosines[k] +
        r * plane.rowPixelSpacing * plane.columnCosines[k]);
      const last = { c: plane.columns - 1, r: plane.rows - 1 };
      const corners = {
        tlhc: vp.worldToCanvas(world(0, 0)),
        trhc: vp.worldToCanvas(world(last.c, 0)),
        blhc: vp.worldToCanvas(world(0, last.r)),
      };
      const sop = /\/instances\/([0-9.]+)\//.exec(imageId);
      return { imageId, sopInstanceUID: sop && sop[1], imageIndex: vp.getCurrentImageIdIndex(), corners, rows: plane.rows, columns: plane.columns };
    });
    Object.assign(report, shown);
    const overlayText = await page.locator('.viewport-overlay').allInnerTexts().catch(() => []);
    report.overlayText = overlayText.join(' | ').replace(/\s+/g, ' ');

    const clip = await page.locator('.cornerstone-canvas').first().boundingBox();
    report.clip = clip;
    const setVisible = (segmentIndex, visible) =>
      page.evaluate(([viewportId, segmentationId, index, isVisible]) =>
        window.services.segmentationService.setSegmentVisibility(viewportId, segmentationId, index, isVisible),
      [state.viewportId, state.segmentationId, segmentIndex, visible]);

    let last = await stableShot(page, clip, path.join(args.outDir, 'with-seg.png'));
    await page.screenshot({ path: path.join(args.outDir, 'page.png') });
    for (const only of state.segments) {
      for (const s of state.segments) await setVisible(s.segmentIndex, s.segmentIndex === only.segmentIndex);
      // With a single segment, "only it" is what was already shown: nothing to wait for.
      const expectChange = state.segments.length > 1;
      last = await stableShot(page, clip, path.join(args.outDir, `segment-${only.segmentIndex}.png`),
        expectChange ? last : null);
    }
    for (const s of state.segments) await setVisible(s.segmentIndex, false);
    await stableShot(page, clip, path.join(args.outDir, 'without-seg.png'), last);
    step('screenshots taken');
  } catch (err) {
    if (page) await page.screenshot({ path: path.join(args.outDir, 'page-failed.png') }).catch(() => {});
    throw err;
  } finally {
    writeReport();
    await browser.close();
  }
}

main().catch((err) => {
  report.error = String(err && err.stack ? err.stack : err);
  try {
    writeReport();
    fs.renameSync(path.join(args.outDir, 'report.json'), path.join(args.outDir, 'report-failed.json'));
  } catch (e) {
    // outDir not writable: stderr still carries the error
  }
  process.stderr.write(`ohif-driver: ${report.error}\n`);
  process.exit(1);
});
