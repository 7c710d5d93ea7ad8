// binderbox pages: the launch form, the launch progress and nothing else. No framework.
// User text is only ever inserted with textContent or form values.
"use strict";

const DATA = JSON.parse(document.getElementById("page-data").textContent || "{}");
const $ = (id) => document.getElementById(id);

// ---------- Home: the launch form, share link and badges ----------

const CONTENT = ["zenodo", "figshare", "hydroshare", "dataverse", "ckan"];
// Providers without a ref: the records, and prebuilt images (the tag is in the name).
const NO_REF = CONTENT.concat(["image"]);

// A whole address of a repository on any git host: a scheme git can fetch, a host, a path.
const GIT_ADDRESS = /^(https?|git):\/\/[^\/\s]+\/\S+/i;

// What a pasted address means: {provider, repo, ref} or null.
function detect(text) {
  const value = text.trim();
  let url;
  if (/^(doi:)?10\.\d{4,}\//i.test(value)) {
    const doi = value.replace(/^doi:/i, "");
    if (/zenodo/i.test(doi)) return { provider: "zenodo", repo: doi };
    if (/figshare/i.test(doi)) return { provider: "figshare", repo: doi };
    if (/hydroshare|10\.4211\/hs\./i.test(doi)) return { provider: "hydroshare", repo: doi };
    return { provider: "dataverse", repo: doi };
  }
  try { url = new URL(value); } catch (e) { return null; }
  if (!/^(https?|git):$/.test(url.protocol)) return null;
  const host = url.hostname.replace(/^www\./, "");
  const parts = url.pathname.replace(/\.git$/, "").split("/").filter(Boolean);
  if (host === "doi.org" || host === "dx.doi.org") return detect(parts.join("/"));
  // A GitHub, Gist or GitLab address still being typed (no repository yet) is no other git host.
  if (["github.com", "gist.github.com", "gitlab.com"].includes(host) && parts.length < 2) return null;
  if (host === "github.com" && parts.length >= 2) {
    const ref = parts[2] === "tree" || parts[2] === "blob" ? parts.slice(3).join("/") : "";
    return { provider: "gh", repo: parts[0] + "/" + parts[1], ref: ref };
  }
  if (host === "gist.github.com" && parts.length >= 2) {
    return { provider: "gist", repo: parts[0] + "/" + parts[1], ref: parts[2] || "" };
  }
  if (host === "gitlab.com" && parts.length >= 2) {
    const cut = parts.indexOf("-");
    const repo = (cut === -1 ? parts : parts.slice(0, cut)).join("/");
    const ref = cut !== -1 && parts[cut + 1] === "tree" ? parts.slice(cut + 2).join("/") : "";
    return { provider: "gl", repo: repo, ref: ref };
  }
  if (/(^|\.)zenodo\.org$/.test(host)) return { provider: "zenodo", repo: value };
  if (/(^|\.)figshare\.com$/.test(host)) return { provider: "figshare", repo: value };
  if (/(^|\.)hydroshare\.org$/.test(host)) return { provider: "hydroshare", repo: value };
  if (/dataverse/.test(host) || /dataset\.xhtml/.test(url.pathname)) return { provider: "dataverse", repo: value };
  if (/\/dataset\//.test(url.pathname) && !/\.git$/.test(value)) return { provider: "ckan", repo: value };
  return { provider: "git", repo: value };
}

// The /v2/ path for provider, repository and ref, or "" when incomplete.
function launchPath(provider, repo, ref) {
  repo = repo.trim().replace(/^\/+|\/+$/g, "");
  ref = ref.trim();
  if (!repo) return "";
  const enc = encodeURIComponent;
  const refPart = (fallback) => (ref ? ref.split("/").map(enc).join("/") : fallback);
  if (provider === "gh" || provider === "gist") {
    return "/v2/" + provider + "/" + repo.split("/").map(enc).join("/") + "/" + refPart("HEAD");
  }
  if (provider === "gl" || provider === "git") {
    return "/v2/" + provider + "/" + enc(repo) + "/" + refPart("HEAD");
  }
  if (provider === "image") return "/v2/image/" + repo.split("/").map(enc).join("/");
  // Records: a DOI keeps its slash, anything else is one escaped segment.
  const spec = /^10\.\d{4,}\/[^\s?#]+$/.test(repo) ? repo.split("/").map(enc).join("/") : enc(repo);
  return "/v2/" + provider + "/" + spec;
}

function initHome() {
  const providers = {};
  for (const p of DATA.providers || []) providers[p.provider] = p;
  const form = $("launch-form"), provider = $("provider"), repo = $("repo"), ref = $("ref");
  const path = $("path"), kind = $("path-kind");

  function relabel() {
    const p = providers[provider.value] || {};
    $("repo-label").textContent = p.repo_label || "Repository";
    $("ref-label").textContent = p.ref_label || "Ref";
    $("ref-field").hidden = NO_REF.includes(provider.value);
    repo.placeholder = DATA.placeholders[provider.value] || "";
  }

  function link() {
    const base = launchPath(provider.value, repo.value, NO_REF.includes(provider.value) ? "" : ref.value);
    if (!base) return "";
    const target = path.value.trim();
    if (!target) return location.origin + base;
    // labpath opens a file in JupyterLab; the classic Notebook view opens it at tree/.
    if (kind.value === "notebook") return location.origin + base + "?urlpath=" + encodeURIComponent("tree/" + target.replace(/^\/+/, ""));
    const key = kind.value === "url" ? "urlpath" : "labpath";
    return location.origin + base + "?" + key + "=" + encodeURIComponent(target);
  }

  function update() {
    const url = link();
    $("launch").disabled = !url;
    $("share-empty").hidden = !!url;
    $("share-body").hidden = !url;
    if (!url) return;
    const badge = location.origin + "/badge_logo.svg";
    $("share-url").value = url;
    $("badge-preview-link").href = url;
    $("badge-md").value = "[![Binder](" + badge + ")](" + url + ")";
    $("badge-rst").value = ".. image:: " + badge + "\n   :target: " + url;
    $("badge-html").value = '<a href="' + url.replace(/"/g, "&quot;") + '"><img src="' + badge + '" alt="Launch Binder"></a>';
    try { history.replaceState(null, "", "?" + new URLSearchParams({ provider: provider.value, repo: repo.value, ref: ref.value, path: path.value, kind: kind.value })); } catch (e) { /* ignore */ }
  }

  repo.addEventListener("input", () => {
    const found = detect(repo.value);
    if (found && providers[found.provider] && (found.provider !== "git" || provider.value === "git" || GIT_ADDRESS.test(repo.value.trim()))) {
      provider.value = found.provider;
      repo.value = found.repo;
      if (found.ref) ref.value = found.ref;
      relabel();
    }
    update();
  });
  provider.addEventListener("change", () => { relabel(); update(); });
  for (const el of [ref, path, kind]) el.addEventListener("input", update);
  kind.addEventListener("change", update);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const url = link();
    if (!url) { $("form-error").textContent = "Enter a repository first."; repo.focus(); return; }
    location.href = url;
  });
  for (const button of document.querySelectorAll("button.copy")) {
    button.addEventListener("click", async () => {
      const field = $(button.dataset.copy);
      let done = false;
      try { await navigator.clipboard.writeText(field.value); done = true; } catch (e) {
        field.select(); try { done = document.execCommand("copy"); } catch (e2) { done = false; }
      }
      $("copy-status").textContent = done ? "Copied." : "Select the text and copy it.";
    });
  }
  const saved = new URLSearchParams(location.search);
  if (saved.get("provider") && providers[saved.get("provider")]) provider.value = saved.get("provider");
  repo.value = saved.get("repo") || "";
  ref.value = saved.get("ref") || "";
  path.value = saved.get("path") || "";
  if (["url", "notebook"].includes(saved.get("kind"))) kind.value = saved.get("kind");
  relabel();
  update();
}

// ---------- Launch: progress, live log, failure and redirect ----------

// ANSI SGR colour codes → spans; any other escape sequence is dropped.
function ansiAppend(target, text, state) {
  const pattern = /\x1b\[([0-9;]*)([A-Za-z])/g;
  let last = 0, match;
  const emit = (chunk) => {
    if (!chunk) return;
    const classes = [];
    if (state.bold) classes.push("ansi-bold");
    if (state.dim) classes.push("ansi-dim");
    if (state.italic) classes.push("ansi-italic");
    if (state.underline) classes.push("ansi-underline");
    if (state.fg !== null) classes.push("ansi-fg-" + state.fg);
    if (!classes.length) { target.appendChild(document.createTextNode(chunk)); return; }
    const span = document.createElement("span");
    span.className = classes.join(" ");
    span.textContent = chunk;
    target.appendChild(span);
  };
  while ((match = pattern.exec(text)) !== null) {
    emit(text.slice(last, match.index));
    last = pattern.lastIndex;
    if (match[2] !== "m") continue;
    const codes = match[1] === "" ? [0] : match[1].split(";").map(Number);
    for (let i = 0; i < codes.length; i++) {
      const c = codes[i];
      if (c === 0) Object.assign(state, { bold: false, dim: false, italic: false, underline: false, fg: null });
      else if (c === 1) state.bold = true;
      else if (c === 2) state.dim = true;
      else if (c === 3) state.italic = true;
      else if (c === 4) state.underline = true;
      else if (c === 22) state.bold = state.dim = false;
      else if (c === 39) state.fg = null;
      else if (c >= 30 && c <= 37) state.fg = c - 30;
      else if (c >= 90 && c <= 97) state.fg = c - 90 + 8;
      else if (c === 38 && codes[i + 1] === 5) { const n = codes[i + 2]; state.fg = n < 16 ? n : null; i += 2; }
      else if (c === 38 && codes[i + 1] === 2) { i += 4; }
    }
  }
  emit(text.slice(last).replace(/\x1b/g, ""));
}

const ORDER = ["fetching", "waiting", "building", "built", "launching", "ready"];
const ICONS = { working: "#c2185b", ready: "#1b7f3b", failed: "#b3261e" };

function setFavicon(state) {
  const colour = ICONS[state] || ICONS.working;
  const mark = state === "failed" ? '<path d="M11 11l10 10M21 11L11 21" stroke="#fff" stroke-width="3.5" stroke-linecap="round"/>'
    : state === "ready" ? '<path d="M10 16.5l4 4 8-9" stroke="#fff" stroke-width="3.5" fill="none" stroke-linecap="round"/>'
    : '<circle cx="16" cy="16" r="6" fill="#fff"/>';
  const svg = '<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 32 32"><rect x="3" y="3" width="26" height="26" rx="7" fill="' + colour + '"/>' + mark + "</svg>";
  $("favicon").href = "data:image/svg+xml," + encodeURIComponent(svg);
}

function initLaunch() {
  const query = new URLSearchParams(location.search);
  const buildOnly = (query.get("build_only") || "").toLowerCase() === "true";
  const log = $("log"), started = Date.now();
  let ansi = { bold: false, dim: false, italic: false, underline: false, fg: null };
  let finished = false, sawBuilding = false, follow = true, source = null, opened = 0, lastPhase = "";
  let refused = 0;
  const name = DATA.name;

  const tick = setInterval(() => {
    const s = Math.floor((Date.now() - started) / 1000);
    $("elapsed").textContent = Math.floor(s / 60) + ":" + String(s % 60).padStart(2, "0");
  }, 1000);

  log.addEventListener("scroll", () => {
    follow = log.scrollTop + log.clientHeight >= log.scrollHeight - 12;
    $("log-paused").hidden = follow;
  });

  function addLog(text) {
    if (!text) return;
    ansiAppend(log, text.endsWith("\n") ? text : text + "\n", ansi);
    if (follow) log.scrollTop = log.scrollHeight;
  }

  function say(text, title) {
    $("state").textContent = text;
    document.title = title + " · " + name + " · binderbox";
  }

  function showPhase(phase, failed) {
    const at = ORDER.indexOf(phase);
    if (at === -1) return;
    for (const li of $("phases").children) {
      const i = ORDER.indexOf(li.dataset.phase);
      li.className = i < at ? "done" : i === at ? (failed ? "failed" : phase === "ready" ? "done" : "current") : "";
      if (li.dataset.phase === "building" && i < at && !sawBuilding) li.className = "skipped";
      if (li.dataset.phase === "waiting" && i < at && lastPhase !== "waiting" && !li.dataset.seen) li.className = "skipped";
      if (i === at) li.setAttribute("aria-current", "step"); else li.removeAttribute("aria-current");
    }
  }

  function finish(state) {
    finished = true;
    clearInterval(tick);
    if (source) source.close();
    setFavicon(state);
  }

  function failed(data) {
    const message = data.message || "The launch failed.";
    let reason = message.split("\n\nThe last lines of the build log:")[0];
    // Only the service's own log_url becomes a link, never an address in the message
    // (which may be text a build printed).
    const logUrl = data.log_url || "";
    const whole = reason.match(/\s*The whole log: (\S+)\s*$/);
    if (whole && logUrl && whole[1] === logUrl) reason = reason.slice(0, whole.index);
    $("reason").textContent = reason;
    if (logUrl && /^https?:\/\//.test(logUrl)) { $("full-log").href = logUrl; $("full-log").hidden = false; }
    if (data.log_tail && !log.textContent.trim()) addLog(data.log_tail);
    $("failure").hidden = false;
    showPhase(lastPhase || "fetching", true);
    for (const li of $("phases").children) if (li.getAttribute("aria-current")) li.className = "failed";
    say("Failed", "Failed");
    finish("failed");
    $("retry").focus();
  }

  function ready(data) {
    showPhase("ready");
    if (buildOnly || !data.url || !data.token) {
      say("Built: the image is ready (build only, nothing was launched).", "Built");
      const starting = document.querySelector('[data-phase="launching"]');
      if (starting.className !== "done" || buildOnly) starting.className = "skipped";
      finish("ready");
      return;
    }
    say("Ready: opening your session…", "Ready");
    finish("ready");
    let path = query.get("urlpath") || "";
    if (query.get("labpath")) path = "lab/tree/" + query.get("labpath");
    else if (query.get("filepath")) path = "tree/" + query.get("filepath");
    path = path.replace(/^\/+/, "");
    const target = new URL(data.url + path);
    target.searchParams.set("token", data.token);
    location.href = target.toString();
  }

  function onEvent(event) {
    if (finished) return;
    let data;
    try { data = JSON.parse(event.data); } catch (e) { return; }
    const phase = data.phase;
    if (phase === "failed") { failed(data); return; }
    if (phase === "ready") { ready(data); return; }
    if (phase === "waiting") {
      document.querySelector('[data-phase="waiting"]').dataset.seen = "1";
      const where = data.position ? "Waiting for a build slot: position " + data.position + " in the queue." : data.message;
      say(where, "Queued (" + (data.position || "…") + ")");
    } else if (phase === "building") {
      sawBuilding = true;
      say("Building the image…", "Building");
      addLog(data.message);
    } else if (phase === "built") {
      say(sawBuilding ? "Built, launching…" : "This image is cached, launching…", "Launching");
      if (data.log_url && /^https?:\/\//.test(data.log_url)) $("full-log").href = data.log_url;
    } else if (phase === "launching") {
      say(data.message || "Starting the session…", "Starting");
    } else if (phase === "fetching") {
      say("Resolving the repository…", "Resolving");
    }
    if (phase !== "building" && phase !== "waiting" && data.message) addLog("\x1b[2m" + data.message + "\x1b[0m");
    if (ORDER.includes(phase)) { lastPhase = phase; showPhase(phase); }
  }

  function connect() {
    const params = new URLSearchParams(location.search);
    params.set("build_token", DATA.build_token);
    source = new EventSource(DATA.build_url + "?" + params.toString());
    source.onopen = () => {
      opened += 1;
      if (opened > 1) {
        // The stream starts again from the first event (a running build is shared, its log replayed).
        log.textContent = "";
        ansi = { bold: false, dim: false, italic: false, underline: false, fg: null };
        sawBuilding = false;
      }
    };
    source.onmessage = onEvent;
    source.onerror = () => {
      if (finished) { source.close(); return; }
      if (source.readyState === EventSource.CONNECTING) say("Connection lost, reconnecting…", "Reconnecting");
      else if (++refused >= 5) failed({ message: "The service could not be reached or refused the request; try again later." });
      else { say("Connection lost; retrying in a few seconds…", "Reconnecting"); setTimeout(connect, 3000); }
    };
  }

  $("retry").addEventListener("click", () => location.reload());
  setFavicon("working");
  say("Connecting…", "Starting");
  connect();
}

if (document.body.dataset.page === "home") initHome();
else if (document.body.dataset.page === "launch") initLaunch();
