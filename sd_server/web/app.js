// The web app: plain JavaScript on the service's own API. Signing in exchanges an API key for a session cookie
// (HttpOnly: this script never sees it); requests that change something send the session's CSRF token.
"use strict";

const state = { me: null, csrf: null, job: null, historyCursor: null };
const $ = (id) => document.getElementById(id);
const TERMINAL = ["succeeded", "failed", "cancelled"];

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(options.json);
  }
  if (state.csrf && options.method && options.method !== "GET") headers["X-CSRF-Token"] = state.csrf;
  const response = await fetch(path, { ...options, headers, credentials: "same-origin" });
  if (response.status === 401 && path !== "/session") {
    showSignIn();
    throw new Error("sign in first");
  }
  if (!response.ok) throw new Error(await errorText(response));
  if (response.status === 204) return null;
  return (response.headers.get("content-type") || "").includes("json") ? response.json() : response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    if (Array.isArray(body.detail)) return body.detail.map((d) => `${(d.loc || []).slice(1).join(".")}: ${d.msg}`).join("; ");
    return body.detail || response.statusText;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// --- signing in ---------------------------------------------------------------------------------------------

async function boot() {
  try {
    const session = await api("/session");
    signedIn(session);
  } catch {
    showSignIn();
  }
}

function showSignIn() {
  $("signin").hidden = false;
  $("nav").hidden = true;
  document.querySelectorAll(".view").forEach((view) => (view.hidden = true));
  $("api-key").focus();
}

function signedIn(session) {
  state.me = session;
  state.csrf = session.csrf_token;
  $("signin").hidden = true;
  $("nav").hidden = false;
  $("nav-admin").hidden = session.role !== "admin";
  $("lora-form").hidden = session.role !== "admin";  // uploading a LoRA is an admin's route
  const name = session.open ? "open mode (no key needed)" : `${session.user_id} (${session.role})`;
  $("who").innerHTML = "";
  $("who").append(name);
  if (!session.open) {
    const out = document.createElement("button");
    out.textContent = "Sign out";
    out.addEventListener("click", async () => {
      await api("/session", { method: "DELETE" });
      location.reload();
    });
    $("who").append(" ", out);
  }
  loadStyles();
  route();
}

$("signin-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("signin-error").textContent = "";
  try {
    signedIn(await api("/session", { method: "POST", json: { api_key: $("api-key").value } }));
    $("api-key").value = "";
  } catch (error) {
    $("signin-error").textContent = error.message;
  }
});

function myUser() {
  return state.me.user_id || "default";
}

// --- views ---------------------------------------------------------------------------------------------------

function route() {
  const name = (location.hash || "#generate").slice(1);
  document.querySelectorAll(".view").forEach((view) => (view.hidden = view.id !== `view-${name}`));
  document.querySelectorAll("#nav a").forEach((link) => link.setAttribute("aria-current", link.hash === `#${name}` ? "page" : "false"));
  if (name === "history") loadHistory(true);
  if (name === "model") loadModel();
  if (name === "admin") loadAdmin();
}
window.addEventListener("hashchange", () => state.me && route());

// --- generate --------------------------------------------------------------------------------------------------

async function loadStyles() {
  const box = $("styles");
  box.innerHTML = "";
  for (const style of await api("/styles")) {
    const label = document.createElement("label");
    label.className = "style";
    label.title = style.prompt + (style.negative_prompt ? ` (not: ${style.negative_prompt})` : "");
    const check = Object.assign(document.createElement("input"), { type: "checkbox", value: style.name, name: "style" });
    label.append(check, " ", style.name);
    box.append(label);
  }
  $("styles-box").hidden = !box.children.length;
}

function requestBody() {
  const form = $("generate-form");
  const body = { prompt: form.prompt.value };
  if (form.negative_prompt.value) body.negative_prompt = form.negative_prompt.value;
  for (const name of ["width", "height", "num_inference_steps", "num_images"]) body[name] = parseInt(form[name].value, 10);
  body.guidance_scale = parseFloat(form.guidance_scale.value);
  if (form.seed.value !== "") body.seed = parseInt(form.seed.value, 10);
  if (form.scheduler.value) body.scheduler = form.scheduler.value;
  const styles = [...$("styles").querySelectorAll("input:checked")].map((check) => check.value);
  if (styles.length) body.styles = styles;
  if (!$("canvas-box").hidden) {
    body.init_image = $("init-canvas").toDataURL("image/png");
    body.strength = parseFloat($("strength").value);
    if (maskPainted) body.mask_image = maskImage();
  }
  if (state.me.user_id) body.user_id = state.me.user_id;
  return body;
}

$("generate-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("generate-error").textContent = "";
  $("generate-button").disabled = true;
  try {
    const created = await api("/jobs", { method: "POST", json: requestBody() });
    follow(created.job_id);
  } catch (error) {
    $("generate-error").textContent = error.message;
    $("generate-button").disabled = false;
  }
});

function followEvents(url, handlers, ended) {
  // An event stream with a handler per event name; the terminal event closes it (the stream ends with its subject:
  // without close(), browsers reconnect every 3 s) and goes to ended(name, data).
  const events = new EventSource(url, { withCredentials: true });
  for (const [name, handle] of Object.entries(handlers)) {
    events.addEventListener(name, (event) => handle(JSON.parse(event.data)));
  }
  for (const name of TERMINAL) {
    events.addEventListener(name, (event) => {
      events.close();
      ended(name, JSON.parse(event.data));
    });
  }
  return events;
}

function follow(jobId) {
  state.job = jobId;
  setProgress(0, "queued");
  $("preview").hidden = true;
  $("progress-box").hidden = false;
  $("cancel-button").hidden = false;
  const events = followEvents(
    `/jobs/${jobId}/events`,
    {
      progress: (data) => {
        setProgress(Math.round((100 * data.step) / data.total), `step ${data.step} of ${data.total}`);
        if (data.preview) showPreview(data.preview);
      },
      started: () => setProgress(0, "running"),
    },
    (name, job) => finished(job),
  );
  events.onerror = () => {
    if (events.readyState === EventSource.CLOSED) $("generate-button").disabled = false;
  };
}

function showPreview(dataUrl) {
  $("preview").src = dataUrl;
  $("preview").hidden = false;
}

function setProgress(percent, text) {
  $("progress").value = percent;
  $("progress").setAttribute("aria-valuenow", String(percent));
  $("progress-text").textContent = `${percent} % (${text})`;
}

function finished(job) {
  $("preview").hidden = true;
  $("generate-button").disabled = false;
  $("cancel-button").hidden = true;
  if (job.status !== "succeeded") {
    setProgress(0, job.status);
    $("generate-error").textContent = job.error || `the job was ${job.status}`;
    return;
  }
  setProgress(100, "done");
  const results = $("results");
  results.innerHTML = "";
  for (const image of job.result.images) results.append(resultCard(job, image));
}

function resultCard(job, image) {
  const card = document.createElement("figure");
  const picture = document.createElement("img");
  picture.src = image.url;
  picture.alt = `${job.result.parameters.prompt} (seed ${image.seed})`;
  picture.className = "result";
  const caption = document.createElement("figcaption");
  const download = document.createElement("a");
  download.href = image.url;
  download.download = `seed-${image.seed}.png`;
  download.textContent = "Download";
  const useSeed = button("Use this seed", () => {
    $("seed").value = image.seed;
    $("num_images").value = 1;
  });
  const toImg2img = button("Send to img2img", () => loadInit(image.url));
  const provenance = document.createElement("dl");
  provenance.className = "facts provenance";
  const check = button("Check provenance", async () => {
    try {
      const picture = await (await api(image.url)).blob();
      showVerification(provenance, await verifyImage(picture, `seed-${image.seed}.png`));
    } catch (error) {
      provenance.textContent = `could not check: ${error.message}`;
    }
  });
  const details = document.createElement("details");
  details.innerHTML = "<summary>Parameters</summary>";
  const parameters = document.createElement("pre");
  parameters.textContent = JSON.stringify(job.result.parameters, null, 2);
  details.append(parameters);
  caption.append(generatedBadge(), ` seed ${image.seed} `, download, " ", useSeed, " ", toImg2img, " ", check, provenance, details);
  card.append(picture, caption);
  return card;
}

function button(text, onClick) {
  const element = document.createElement("button");
  element.type = "button";
  element.textContent = text;
  element.addEventListener("click", onClick);
  return element;
}

$("cancel-button").addEventListener("click", async () => {
  if (state.job) await api(`/jobs/${state.job}/cancel`, { method: "POST" }).catch(() => {});
});

// --- init image and mask painting --------------------------------------------------------------------------

let maskPainted = false;

$("strength").addEventListener("input", () => ($("strength-value").textContent = $("strength").value));
$("init-file").addEventListener("change", () => {
  const file = $("init-file").files[0];
  if (file) loadInit(URL.createObjectURL(file));
});
$("clear-mask").addEventListener("click", clearMask);
$("clear-init").addEventListener("click", () => {
  $("canvas-box").hidden = true;
  $("init-file").value = "";
});

function loadInit(url) {
  const picture = new Image();
  picture.onload = () => {
    for (const canvas of [$("init-canvas"), $("mask-canvas")]) {
      canvas.width = picture.naturalWidth;
      canvas.height = picture.naturalHeight;
    }
    $("init-canvas").getContext("2d").drawImage(picture, 0, 0);
    clearMask();
    $("canvas-box").hidden = false;
    $("width").value = picture.naturalWidth;
    $("height").value = picture.naturalHeight;
    location.hash = "#generate";
  };
  picture.src = url;
}

function clearMask() {
  const canvas = $("mask-canvas");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  maskPainted = false;
}

function maskImage() {
  // The painted strokes (semi-transparent on screen) as a black-and-white mask: white repaints.
  const painted = $("mask-canvas");
  const mask = document.createElement("canvas");
  mask.width = painted.width;
  mask.height = painted.height;
  const context = mask.getContext("2d");
  context.fillStyle = "black";
  context.fillRect(0, 0, mask.width, mask.height);
  const pixels = painted.getContext("2d").getImageData(0, 0, mask.width, mask.height);
  const out = context.getImageData(0, 0, mask.width, mask.height);
  for (let i = 0; i < pixels.data.length; i += 4) {
    if (pixels.data[i + 3] > 0) out.data[i] = out.data[i + 1] = out.data[i + 2] = 255;
  }
  context.putImageData(out, 0, 0);
  return mask.toDataURL("image/png");
}

(function enablePainting() {
  const canvas = $("mask-canvas");
  let drawing = false;
  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    return [((event.clientX - box.left) * canvas.width) / box.width, ((event.clientY - box.top) * canvas.height) / box.height];
  };
  const paint = (event) => {
    if (!drawing) return;
    const context = canvas.getContext("2d");
    const [x, y] = point(event);
    context.fillStyle = "rgba(255, 64, 64, 0.6)";
    context.beginPath();
    context.arc(x, y, parseInt($("brush").value, 10) / 2, 0, 2 * Math.PI);
    context.fill();
    maskPainted = true;
  };
  canvas.addEventListener("pointerdown", (event) => {
    drawing = true;
    canvas.setPointerCapture(event.pointerId);
    paint(event);
  });
  canvas.addEventListener("pointermove", paint);
  canvas.addEventListener("pointerup", () => (drawing = false));
})();

// --- history -------------------------------------------------------------------------------------------------

async function loadHistory(fromStart) {
  if (fromStart) {
    $("history").innerHTML = "";
    state.historyCursor = null;
  }
  const query = new URLSearchParams({ limit: "12" });
  if (state.historyCursor) query.set("cursor", state.historyCursor);
  const page = await api(`/jobs?${query}`);
  for (const job of page.jobs) $("history").append(historyCard(job));
  state.historyCursor = page.next_cursor;
  $("history-more").hidden = !page.next_cursor;
}
$("history-more").addEventListener("click", () => loadHistory(false));

function historyCard(job) {
  const card = document.createElement("figure");
  card.className = "history-item";
  if (job.result && job.result.image_url) {
    const thumbnail = document.createElement("img");
    thumbnail.src = job.result.image_url;
    thumbnail.alt = job.result.parameters.prompt;
    thumbnail.loading = "lazy";
    card.append(thumbnail);
  }
  const caption = document.createElement("figcaption");
  caption.textContent = `${job.status} · ${new Date(job.created_at).toLocaleString()}`;
  if (job.result) {
    caption.prepend(generatedBadge(), " ");
    caption.append(" ", button("Send to img2img", () => loadInit(job.result.image_url)));
    caption.title = job.result.parameters.prompt;
  }
  card.append(caption);
  return card;
}

// --- provenance ---------------------------------------------------------------------------------------------

function generatedBadge() {
  const badge = document.createElement("span");
  badge.className = "badge";
  badge.textContent = "AI-generated";
  badge.title = "Marked as generated: signed Content Credentials, IPTC metadata and an invisible watermark";
  return badge;
}

async function verifyImage(blob, name) {
  const form = new FormData();
  form.append("image", blob, name);
  return api("/provenance/verify", { method: "POST", body: form });
}

function verificationFacts(report) {
  // One line a mark, in words: what the picture carries and whether its signature holds.
  const credentials = report.credentials;
  const watermark = report.watermark;
  const metadata = report.metadata;
  return [
    ["Generated", report.generated ? "yes: marked as made by an AI model" : "no mark says so"],
    ["Content Credentials", !credentials ? "none"
      : credentials.signature_valid ? `signature valid${credentials.trusted ? ", trusted" : " (signer not trusted here)"}: ${credentials.signer}, ${credentials.generator || "unknown tool"}`
      : `signature broken (${credentials.failures.join(", ")})`],
    ["Metadata", metadata && metadata.digital_source_type ? metadata.digital_source_type.split("/").pop() : "none"],
    ["Watermark", watermark
      ? `service ${watermark.service_id}${watermark.this_service ? " (this service)" : ""}, picture ${watermark.fingerprint}`
      : `none found (confidence ${report.watermark_confidence})`],
  ];
}

function showVerification(list, report) {
  list.innerHTML = "";
  for (const [term, text] of verificationFacts(report)) {
    const dt = document.createElement("dt");
    const dd = document.createElement("dd");
    dt.textContent = term;
    dd.textContent = text;
    list.append(dt, dd);
  }
}

$("verify-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("verify-error").textContent = "";
  $("verify-result").innerHTML = "";
  const file = $("verify-file").files[0];
  try {
    showVerification($("verify-result"), await verifyImage(file, file.name));
  } catch (error) {
    $("verify-error").textContent = error.message;
  }
});

// --- my model, trainings ---------------------------------------------------------------------------------

function modelFacts(model, trained) {
  // What a person wants to know of their model: what it is, what it builds on, when it was trained.
  if (model.kind === "checkpoint") return [["Model", model.source], ["Kind", "a full model (checkpoint)"]];
  const facts = [["Model", trained ? "your own, trained from your photos" : "a LoRA adapter"], ["Base", model.base]];
  if (model.scale !== 1) facts.push(["Strength", String(model.scale)]);
  if (trained) facts.push(["Trained", `${new Date(trained.finished_at).toLocaleString()}, from ${trained.photos} photos, trigger word "${trained.settings.trigger}"`]);
  return facts;
}

async function loadModel() {
  const info = $("model-info");
  info.innerHTML = "";
  $("model-samples").innerHTML = "";
  const trainings = await api("/trainings?limit=20").catch(() => ({ trainings: [] }));
  try {
    const entry = await api(`/users/${myUser()}/model`);
    const trained = trainings.trainings.find((training) => training.model && training.model.source === entry.model.source);
    for (const [name, value] of modelFacts(entry.model, trained)) info.append(Object.assign(document.createElement("dt"), { textContent: name }), Object.assign(document.createElement("dd"), { textContent: value }));
    $("lora-base").placeholder = entry.model.base || entry.model.source;
    for (const url of trained ? trained.samples : []) $("model-samples").append(sampleCard(url));
  } catch (error) {
    info.append(Object.assign(document.createElement("dd"), { textContent: error.message }));
  }
  const list = $("trainings");
  list.innerHTML = "";
  for (const training of trainings.trainings) {
    const item = document.createElement("li");
    item.textContent = `${training.status}: ${training.progress.step}/${training.progress.total} steps, ${new Date(training.created_at).toLocaleString()}`;
    list.append(item);
  }
}

$("lora-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("lora-error").textContent = "";
  const form = new FormData();
  form.append("file", $("lora-file").files[0]);
  form.append("base", $("lora-base").value || $("lora-base").placeholder);
  form.append("scale", $("lora-scale").value);
  try {
    await api(`/users/${myUser()}/lora`, { method: "POST", body: form });
    loadModel();
  } catch (error) {
    $("lora-error").textContent = error.message;
  }
});

$("training-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  $("training-error").textContent = "";
  const form = new FormData();
  for (const photo of $("training-photos").files) form.append("images", photo);
  const fields = { trigger: "training-trigger", class_word: "training-class", steps: "training-steps", resolution: "training-resolution" };
  for (const [name, id] of Object.entries(fields)) if ($(id).value) form.append(name, $(id).value); // empty: the model's recipe
  $("training-button").disabled = true;
  try {
    const created = await api(`/users/${myUser()}/trainings`, { method: "POST", body: form });
    followTraining(created.training_id);
  } catch (error) {
    $("training-error").textContent = error.message;
    $("training-button").disabled = false;
  }
});

function sampleCard(url) {
  const sample = Object.assign(document.createElement("img"), { src: url, alt: "a sample drawn with the trained model", className: "sample" });
  const card = document.createElement("figure");
  card.append(sample);
  return card;
}

function showSamples(urls, caption) {
  // The samples of one moment of the training, newest first: how the model learns the subject.
  const row = document.createElement("div");
  row.className = "sample-row";
  row.append(Object.assign(document.createElement("p"), { textContent: caption }), ...urls.map(sampleCard));
  $("training-samples").prepend(row);
}

function showTrainingRecord(training) {
  const warnings = $("training-warnings");
  warnings.innerHTML = "";
  for (const warning of training.warnings) warnings.append(Object.assign(document.createElement("li"), { textContent: warning }));
  const scores = training.scores;
  $("training-scores").hidden = !scores || !scores.samples;
  if (scores && scores.samples) {
    const shown = scores.samples.filter((sample) => sample.shows_subject).length;
    $("training-scores").textContent = `The ${scores.evaluator} evaluator sees the ${scores.subject} in ${shown} of ${scores.samples.length} samples.`;
  }
}

function followTraining(trainingId) {
  $("training-box").hidden = false;
  $("training-samples").innerHTML = "";
  $("training-warnings").innerHTML = "";
  $("training-scores").hidden = true;
  const show = (percent, text) => {
    $("training-progress").value = percent;
    $("training-status").textContent = text;
  };
  show(0, "queued");
  api(`/trainings/${trainingId}`).then(showTrainingRecord, () => {});
  const trainingEnded = (name, training) => {
    $("training-button").disabled = false;
    if (name !== "succeeded") {
      show(0, training.status);
      $("training-error").textContent = training.error || `the training was ${training.status}`;
      return;
    }
    show(100, training.settings.activate ? "done: your model now draws with what it learned" : "done: the trained model is kept, not made yours");
    showTrainingRecord(training);
    showSamples(training.samples, "trained");
    loadModel();
  };
  followEvents(
    `/trainings/${trainingId}/events`,
    {
      preparing: () => show(0, "preparing the photos"),
      progress: (data) => {
        const eta = data.eta_s == null ? "" : `, about ${Math.ceil(data.eta_s)} s left`;
        show(Math.round((100 * data.step) / data.total), `step ${data.step} of ${data.total}${eta}`);
      },
      samples: (data) => showSamples(data.samples, `at step ${data.step}`),
    },
    trainingEnded,
  );
}

// --- admin ---------------------------------------------------------------------------------------------------

async function loadAdmin() {
  const health = await api("/health");
  $("admin-health").textContent = JSON.stringify({ status: health.status, queue: health.queue, cache: health.cache }, null, 2);
  $("admin-models").textContent = JSON.stringify((await api("/models")).user_models, null, 2);
  const rows = $("keys");
  rows.innerHTML = "";
  for (const key of await api("/keys")) {
    const row = rows.insertRow();
    for (const value of [key.id.slice(0, 8), key.user_id, key.role, key.prefix]) row.insertCell().textContent = value;
    row.insertCell().append(button("Revoke", async () => {
      await api(`/keys/${key.id}`, { method: "DELETE" });
      loadAdmin();
    }));
  }
}

$("key-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  const created = await api("/keys", { method: "POST", json: { user_id: $("key-user").value, role: $("key-role").value } });
  $("key-created").textContent = `New key for ${created.user_id} (shown once): ${created.key}`;
  loadAdmin();
});

boot();
