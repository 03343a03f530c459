// ClawOS web console: one script, no framework, no build step, no external resources.
//
// Served under a strict CSP (script-src 'self', style-src 'self', connect-src 'self'),
// so: no inline handlers, no inline styles, no eval. Every piece of data from the API
// reaches the page through textContent or setAttribute, never as HTML.
//
// The session cookie is HttpOnly (the page never sees it); every request that is not
// a GET carries the session's CSRF token in `x-csrf-token`.
"use strict";

(function () {
  // ---------------------------------------------------------------------------
  // Constants

  const ROLE_RANK = { viewer: 0, operator: 1, admin: 2 };
  const SECTIONS = ["vms", "usage", "audit", "workflows"];
  const SECTION_TITLES = { vms: "VMs", usage: "Usage", audit: "Audit", workflows: "Workflows" };
  const ACTIVE_VM_STATES = new Set(["starting", "running", "paused", "stopping"]);
  const VM_NAME = /^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$/;

  const VM_POLL_MS = 2000;
  const CONSOLE_POLL_MS = 1000;
  const USAGE_POLL_MS = 15000;
  const AUDIT_POLL_MS = 2000;
  const RUNS_POLL_MS = 3000;
  const RUN_POLL_MS = 2000;
  const IDLE_CHECK_MS = 15000;

  // The console log kept in the page: at most CONSOLE_MAX characters; past that the
  // oldest output is dropped down to CONSOLE_KEEP. A newly selected VM shows the last
  // CONSOLE_TAIL bytes of its log, not all of it.
  const CONSOLE_MAX = 200 * 1024;
  const CONSOLE_KEEP = 150 * 1024;
  const CONSOLE_TAIL = 64 * 1024;
  // The launcher answers at most 1 MiB per console request.
  const CONSOLE_CHUNK = 1 << 20;
  const CONSOLE_CHUNKS_PER_TICK = 4;
  // An offset past any log's end: the answer is empty and `x-console-offset` is the
  // log's length (the launcher clamps the offset), which is where a tail starts.
  const CONSOLE_END = Number.MAX_SAFE_INTEGER;

  const AUDIT_PAGE = 200;
  const AUDIT_PAGES_PER_TICK = 20;
  const AUDIT_KEEP = 300;
  const AUDIT_ALERTS_KEEP = 100;

  const RUNS_SHOWN = 100;
  const CHART_ROWS = 20;

  const SVG_NS = "http://www.w3.org/2000/svg";

  // ---------------------------------------------------------------------------
  // Small helpers

  const $ = (id) => document.getElementById(id);

  /** An element; `attrs` values are set as attributes (class → className), children
   *  as nodes or text. */
  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    setAttrs(node, attrs);
    for (const c of children) {
      if (c === null || c === undefined || c === false) continue;
      node.append(c instanceof Node ? c : String(c));
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    setAttrs(node, attrs);
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function setAttrs(node, attrs) {
    if (!attrs) return;
    for (const [k, v] of Object.entries(attrs)) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.setAttribute("class", v);
      else node.setAttribute(k, v === true ? "" : String(v));
    }
  }

  function setText(node, text) {
    const t = text === null || text === undefined ? "" : String(text);
    if (node.textContent !== t) node.textContent = t;
  }

  function show(node, visible) {
    node.hidden = !visible;
  }

  const numberFormat = new Intl.NumberFormat("en-US");
  function fmtInt(n) {
    return typeof n === "number" && Number.isFinite(n) ? numberFormat.format(n) : "—";
  }

  function fmtCompact(n) {
    if (n >= 1e9) return (n / 1e9).toFixed(n >= 1e10 ? 0 : 1) + "G";
    if (n >= 1e6) return (n / 1e6).toFixed(n >= 1e7 ? 0 : 1) + "M";
    if (n >= 1e3) return (n / 1e3).toFixed(n >= 1e4 ? 0 : 1) + "k";
    return String(Math.round(n));
  }

  function pad2(n) {
    return String(n).padStart(2, "0");
  }

  function fmtTime(ms) {
    if (typeof ms !== "number" || !Number.isFinite(ms) || ms <= 0) return "—";
    const d = new Date(ms);
    return (
      `${d.getFullYear()}-${pad2(d.getMonth() + 1)}-${pad2(d.getDate())} ` +
      `${pad2(d.getHours())}:${pad2(d.getMinutes())}:${pad2(d.getSeconds())}`
    );
  }

  function fmtClock(date) {
    return `${pad2(date.getHours())}:${pad2(date.getMinutes())}:${pad2(date.getSeconds())}`;
  }

  function fmtDuration(ms) {
    if (typeof ms !== "number" || !Number.isFinite(ms) || ms < 0) return "—";
    if (ms < 1000) return `${Math.round(ms)} ms`;
    const s = ms / 1000;
    if (s < 60) return `${s.toFixed(s < 10 ? 2 : 1)} s`;
    const m = Math.floor(s / 60);
    if (m < 60) return `${m} min ${Math.round(s - m * 60)} s`;
    return `${Math.floor(m / 60)} h ${m % 60} min`;
  }

  function clip(text, max) {
    const t = String(text);
    return t.length > max ? t.slice(0, max - 1) + "…" : t;
  }

  function enc(segment) {
    return encodeURIComponent(segment);
  }

  function stateBadge(stateText, extraClass) {
    const s = String(stateText || "unknown");
    const cls = /^[a-z_]+$/.test(s) ? `state state-${s}` : "state";
    return el("span", { class: extraClass ? `${cls} ${extraClass}` : cls }, s);
  }

  function setStateBadge(node, stateText) {
    const s = String(stateText || "unknown");
    const keep = node.classList.contains("vm-state") ? " vm-state" : "";
    const cls = (/^[a-z_]+$/.test(s) ? `state state-${s}` : "state") + keep;
    if (node.getAttribute("class") !== cls) node.setAttribute("class", cls);
    setText(node, s);
  }

  // ---------------------------------------------------------------------------
  // The API

  class ApiError extends Error {
    constructor(status, code, message, requestId) {
      super(message);
      this.status = status;
      this.code = code;
      this.requestId = requestId;
    }
  }

  function errorText(e) {
    if (e instanceof ApiError) {
      const id = e.requestId ? ` (request ${e.requestId})` : "";
      return `${e.message}${id}`;
    }
    if (e && e.name === "TypeError") return "the control plane cannot be reached";
    return e && e.message ? e.message : String(e);
  }

  async function failure(resp) {
    let code = "";
    let message = `${resp.status} ${resp.statusText || "error"}`.trim();
    let requestId = resp.headers.get("x-request-id") || "";
    try {
      const body = await resp.json();
      if (body && body.error) {
        code = String(body.error.code || "");
        if (body.error.message) message = String(body.error.message);
        if (body.error.request_id) requestId = String(body.error.request_id);
      }
    } catch (_) {
      // Not JSON (a proxy's page, say): the status line is the message.
    }
    if (resp.status === 404 && code === "not_found" && /route/i.test(message)) {
      message = `this control plane has no such endpoint (${message})`;
    }
    return new ApiError(resp.status, code, message, requestId);
  }

  /** One request; resolves to the Response when it is 2xx, throws ApiError otherwise. */
  async function api(method, path, body) {
    const headers = { Accept: "application/json" };
    if (method !== "GET" && method !== "HEAD" && state.session) {
      headers["x-csrf-token"] = state.session.csrf_token;
    }
    const init = { method, headers, credentials: "same-origin", cache: "no-store", redirect: "error" };
    if (body !== undefined) {
      headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    const resp = await fetch(path, init);
    if (!resp.ok) throw await failure(resp);
    return resp;
  }

  async function apiJson(method, path, body) {
    const resp = await api(method, path, body);
    if (resp.status === 204) return null;
    return resp.json();
  }

  /** A 401 while logged in ends the session in the page too; true when it did. */
  function handleAuth(e) {
    if (e instanceof ApiError && e.status === 401 && state.session) {
      endSession(`Your session ended: ${e.message}`);
      return true;
    }
    return false;
  }

  // ---------------------------------------------------------------------------
  // State

  const state = {
    session: null,
    section: "vms",
    lastActivity: Date.now(),
    vms: new Map(),
    vmRows: new Map(),
    vmBusy: new Map(),
    vmLoaded: false,
    selectedVm: null,
    console: null,
    audit: { after: 0, events: [], alerts: [], dirty: true, total: 0 },
    runs: [],
    runRows: new Map(),
    selectedRun: null,
    runFinalSeen: false,
    stepNodes: new Map(),
  };

  function role() {
    return state.session ? state.session.role : "viewer";
  }

  function canOperate() {
    return (ROLE_RANK[role()] || 0) >= ROLE_RANK.operator;
  }

  // ---------------------------------------------------------------------------
  // Status line (a polite live region)

  let statusTimer = null;
  function announce(message, kind) {
    const node = $("status");
    node.classList.remove("status-error", "status-ok");
    if (kind === "error") node.classList.add("status-error");
    if (kind === "ok") node.classList.add("status-ok");
    node.textContent = message;
    clearTimeout(statusTimer);
    if (kind !== "error") {
      statusTimer = setTimeout(() => {
        if (node.textContent === message) node.textContent = "";
      }, 10000);
    }
  }

  // ---------------------------------------------------------------------------
  // Pollers: one loop each, never overlapping, running only while `when()` holds.

  class Poller {
    constructor(intervalMs, run, when) {
      this.intervalMs = intervalMs;
      this.run = run;
      this.when = when;
      this.timer = null;
      this.busy = false;
      this.again = false;
      this.epoch = 0;
    }

    /** Run now (or right after the current run) and keep going. */
    kick() {
      if (this.busy) {
        this.again = true;
        return;
      }
      clearTimeout(this.timer);
      this.timer = setTimeout(() => this.tick(), 0);
    }

    stop() {
      clearTimeout(this.timer);
      this.timer = null;
      this.again = false;
      this.epoch += 1;
    }

    async tick() {
      this.timer = null;
      if (!state.session || document.visibilityState === "hidden" || !this.when()) return;
      const epoch = this.epoch;
      this.busy = true;
      let delay = this.intervalMs;
      try {
        const soon = await this.run();
        if (soon === true) delay = 250;
      } catch (e) {
        if (!handleAuth(e)) console.warn("poll failed:", e);
      } finally {
        this.busy = false;
      }
      if (this.again) {
        // Kicked while running (perhaps after a stop and a new login): run again now.
        this.again = false;
        delay = 0;
      } else if (epoch !== this.epoch || !state.session) {
        return;
      }
      this.timer = setTimeout(() => this.tick(), delay);
    }
  }

  const pollers = {};

  function startPollers() {
    for (const p of Object.values(pollers)) p.kick();
  }

  function stopPollers() {
    for (const p of Object.values(pollers)) p.stop();
  }

  // ---------------------------------------------------------------------------
  // Session: login, logout, idle logout

  function showLogin(message) {
    show($("login-view"), true);
    show($("app-view"), false);
    show($("nav"), false);
    show($("who"), false);
    document.title = "Log in · ClawOS";
    const err = $("login-error");
    err.textContent = message || "";
    const input = $("login-token");
    input.value = "";
    input.removeAttribute("aria-invalid");
    input.focus();
  }

  function showApp() {
    const s = state.session;
    show($("login-view"), false);
    show($("app-view"), true);
    show($("nav"), true);
    show($("who"), true);
    setText($("operator-name"), s.operator);
    setText($("operator-role"), s.role);
    $("operator-role").setAttribute("aria-label", `role: ${s.role}`);
    for (const node of document.querySelectorAll(".operator-only")) show(node, canOperate());
    showSection(sectionFromHash() || state.section, false);
  }

  function startSession(info) {
    state.session = info;
    state.lastActivity = Date.now();
    showApp();
    startPollers();
  }

  /** Forgets everything the session showed, and shows the login form. */
  function endSession(message) {
    state.session = null;
    stopPollers();
    state.vms.clear();
    state.vmRows.clear();
    state.vmBusy.clear();
    state.vmLoaded = false;
    $("vm-rows").replaceChildren();
    selectVm(null);
    state.audit = { after: 0, events: [], alerts: [], dirty: true, total: 0 };
    $("audit-rows").replaceChildren();
    state.runs = [];
    state.runRows.clear();
    $("run-rows").replaceChildren();
    selectRun(null);
    $("usage-rows").replaceChildren();
    drawUsageChart([]);
    showLogin(message);
  }

  async function login(event) {
    event.preventDefault();
    const input = $("login-token");
    const button = $("login-submit");
    const err = $("login-error");
    const token = input.value.trim();
    if (!token) {
      err.textContent = "Enter an operator API token.";
      input.setAttribute("aria-invalid", "true");
      input.focus();
      return;
    }
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    err.textContent = "";
    try {
      const info = await apiJson("POST", "/api/v1/sessions", { token });
      input.value = "";
      input.removeAttribute("aria-invalid");
      startSession(info);
      announce(`Logged in as ${info.operator} (${info.role}).`, "ok");
    } catch (e) {
      input.setAttribute("aria-invalid", "true");
      err.textContent =
        e instanceof ApiError && e.status === 401
          ? `Log in failed: ${e.message}`
          : `Log in failed: ${errorText(e)}`;
      input.focus();
      input.select();
    } finally {
      button.disabled = false;
      button.removeAttribute("aria-busy");
    }
  }

  async function logout(reason) {
    const button = $("logout");
    button.disabled = true;
    try {
      await api("DELETE", "/api/v1/sessions/current");
    } catch (e) {
      // 401: the session had already ended; anything else: end it here all the same.
      if (!(e instanceof ApiError && e.status === 401)) console.warn("logout:", e);
    } finally {
      button.disabled = false;
    }
    endSession(typeof reason === "string" ? reason : "");
    announce(typeof reason === "string" ? reason : "Logged out.", "ok");
  }

  /** The server ends a session after idle_timeout_secs without a request, but the
   *  page's own polling is a request every second or two: so the page logs out by
   *  itself after that long without a person using it. */
  function checkIdle() {
    const s = state.session;
    if (!s || !s.idle_timeout_secs) return;
    if (Date.now() - state.lastActivity > s.idle_timeout_secs * 1000) {
      const minutes = Math.round(s.idle_timeout_secs / 60);
      logout(`Logged out after ${minutes} minutes without activity.`);
    }
  }

  function noteActivity() {
    state.lastActivity = Date.now();
  }

  async function resumeSession() {
    try {
      const info = await apiJson("GET", "/api/v1/sessions/current");
      startSession(info);
    } catch (e) {
      if (e instanceof ApiError && e.status === 401) showLogin("");
      else showLogin(`Could not check the session: ${errorText(e)}`);
    }
  }

  // ---------------------------------------------------------------------------
  // Sections

  function sectionFromHash() {
    const h = location.hash.replace(/^#/, "");
    return SECTIONS.includes(h) ? h : null;
  }

  function showSection(name, moveFocus) {
    state.section = name;
    for (const node of document.querySelectorAll("section.section")) {
      show(node, node.dataset.section === name);
    }
    for (const a of document.querySelectorAll("#nav a[data-section]")) {
      if (a.dataset.section === name) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    }
    document.title = `${SECTION_TITLES[name]} · ClawOS`;
    if (moveFocus) {
      const heading = document.querySelector(`#section-${name} h1`);
      if (heading) {
        heading.setAttribute("tabindex", "-1");
        heading.focus();
      }
    }
    if (state.session) startPollers();
  }

  function onHashChange() {
    const name = sectionFromHash();
    if (name && state.session) showSection(name, true);
  }

  // ---------------------------------------------------------------------------
  // VMs

  function vmRuntime(vm) {
    return vm.agent_runtime || "clawos-agentd";
  }

  function createVmRow(name) {
    const select = el("button", { type: "button", class: "link-button vm-select", "aria-pressed": "false" }, name);
    select.addEventListener("click", () => selectVm(name, true));
    const stateBadgeNode = el("span", { class: "state vm-state" });
    const reason = el("span", { class: "vm-reason hint" });
    const stop = el("button", { type: "button", class: "btn btn-small btn-danger vm-stop" }, "Stop");
    stop.setAttribute("aria-label", `Stop ${name}`);
    stop.addEventListener("click", () => stopVm(name));
    const del = el("button", { type: "button", class: "btn btn-small vm-delete" }, "Delete");
    del.setAttribute("aria-label", `Delete ${name}`);
    del.addEventListener("click", () => deleteVm(name));
    const cells = {
      state: stateBadgeNode,
      reason,
      mem: el("td", { class: "num" }),
      vcpus: el("td", { class: "num" }),
      backend: el("td"),
      runtime: el("td", { class: "mono" }),
      model: el("td", { class: "mono" }),
      boot: el("td", { class: "num" }),
      select,
      stop,
      del,
    };
    const tr = el(
      "tr",
      { "data-vm": name },
      el("th", { scope: "row" }, select),
      el("td", null, stateBadgeNode, " ", reason),
      cells.mem,
      cells.vcpus,
      cells.backend,
      cells.runtime,
      cells.model,
      cells.boot,
      el("td", null, el("div", { class: "actions" }, stop, del)),
    );
    return { tr, cells };
  }

  function updateVmRow(row, vm) {
    const c = row.cells;
    const busy = state.vmBusy.get(vm.name);
    setStateBadge(c.state, vm.state);
    setText(c.reason, vm.reason ? `— ${vm.reason}` : "");
    setText(c.mem, `${fmtInt(vm.mem_mib)} MiB`);
    setText(c.vcpus, fmtInt(vm.vcpus));
    setText(c.backend, vm.backend || "—");
    setText(c.runtime, vmRuntime(vm));
    setText(c.model, vm.model || "—");
    setText(c.boot, vm.boot_ms ? fmtDuration(vm.boot_ms) : "—");
    const selected = state.selectedVm === vm.name;
    c.select.setAttribute("aria-pressed", selected ? "true" : "false");
    row.tr.classList.toggle("selected", selected);
    row.tr.setAttribute("aria-busy", busy ? "true" : "false");

    const operate = canOperate();
    const active = ACTIVE_VM_STATES.has(vm.state);
    const stopping = busy === "stop" || vm.state === "stopping";
    show(c.stop, operate && active);
    setText(c.stop, stopping ? "Stopping…" : "Stop");
    c.stop.setAttribute("aria-disabled", stopping ? "true" : "false");
    if (busy === "stop") c.stop.setAttribute("aria-busy", "true");
    else c.stop.removeAttribute("aria-busy");
    show(c.del, operate && !active);
    setText(c.del, busy === "delete" ? "Deleting…" : "Delete");
    c.del.setAttribute("aria-disabled", busy === "delete" ? "true" : "false");
    if (busy === "delete") c.del.setAttribute("aria-busy", "true");
    else c.del.removeAttribute("aria-busy");
  }

  /** Puts `rows` (in order) into `tbody`, moving only what is out of place, so a
   *  focused button stays focused across refreshes. */
  function placeRows(tbody, rows) {
    rows.forEach((tr, i) => {
      if (tbody.children[i] !== tr) tbody.insertBefore(tr, tbody.children[i] || null);
    });
    while (tbody.children.length > rows.length) tbody.lastElementChild.remove();
  }

  function renderVms() {
    const names = [...state.vms.keys()].sort();
    for (const [name, row] of state.vmRows) {
      if (!state.vms.has(name)) {
        row.tr.remove();
        state.vmRows.delete(name);
      }
    }
    const rows = names.map((name) => {
      let row = state.vmRows.get(name);
      if (!row) {
        row = createVmRow(name);
        state.vmRows.set(name, row);
      }
      updateVmRow(row, state.vms.get(name));
      return row.tr;
    });
    placeRows($("vm-rows"), rows);
    show($("vm-empty"), state.vmLoaded && names.length === 0);
    if (state.selectedVm && state.vmLoaded && !state.vms.has(state.selectedVm) && state.console) {
      setText($("console-meta"), `${state.selectedVm} no longer exists`);
    }
  }

  async function pollVms() {
    try {
      const list = await apiJson("GET", "/api/v1/vms");
      state.vms = new Map((Array.isArray(list) ? list : []).map((vm) => [vm.name, vm]));
      state.vmLoaded = true;
      show($("vm-error"), false);
      setText($("vm-updated"), `(updated ${fmtClock(new Date())})`);
    } catch (e) {
      if (handleAuth(e)) return;
      const box = $("vm-error");
      box.textContent = `VMs unavailable: ${errorText(e)}`;
      show(box, true);
    }
    renderVms();
  }

  async function stopVm(name) {
    if (!canOperate() || state.vmBusy.has(name)) return;
    const vm = state.vms.get(name);
    if (vm && vm.state === "stopping") return;
    state.vmBusy.set(name, "stop");
    renderVms();
    announce(`Stopping ${name}… (this can take a while)`);
    try {
      const stopped = await apiJson("POST", `/api/v1/vms/${enc(name)}/stop`);
      if (stopped && stopped.name) state.vms.set(stopped.name, stopped);
      announce(`${name} is ${stopped && stopped.state ? stopped.state : "stopped"}.`, "ok");
    } catch (e) {
      if (!handleAuth(e)) announce(`Could not stop ${name}: ${errorText(e)}`, "error");
    } finally {
      state.vmBusy.delete(name);
    }
    if (!state.session) return;
    const row = state.vmRows.get(name);
    const hadFocus = row && document.activeElement === row.cells.stop;
    renderVms();
    if (hadFocus && row.cells.stop.hidden) {
      (row.cells.del.hidden ? row.cells.select : row.cells.del).focus();
    }
    pollers.vms.kick();
  }

  async function deleteVm(name) {
    if (!canOperate() || state.vmBusy.has(name)) return;
    if (!window.confirm(`Delete VM ${name} and its disks? This cannot be undone.`)) return;
    state.vmBusy.set(name, "delete");
    renderVms();
    try {
      await api("DELETE", `/api/v1/vms/${enc(name)}`);
      state.vms.delete(name);
      if (state.selectedVm === name) selectVm(null);
      announce(`${name} deleted.`, "ok");
      $("start-name").focus();
    } catch (e) {
      if (!handleAuth(e)) announce(`Could not delete ${name}: ${errorText(e)}`, "error");
    } finally {
      state.vmBusy.delete(name);
    }
    if (!state.session) return;
    renderVms();
    pollers.vms.kick();
  }

  function fieldError(input, message) {
    input.setAttribute("aria-invalid", "true");
    $("start-error").textContent = message;
    input.focus();
  }

  async function startVm(event) {
    event.preventDefault();
    if (!canOperate()) return;
    const form = event.currentTarget;
    for (const input of form.querySelectorAll("input")) input.removeAttribute("aria-invalid");
    $("start-error").textContent = "";
    const nameInput = $("start-name");
    const memInput = $("start-mem");
    const cpuInput = $("start-vcpus");
    const name = nameInput.value.trim();
    const mem = Number(memInput.value);
    const vcpus = Number(cpuInput.value);
    const image = $("start-image").value.trim();
    const model = $("start-model").value.trim();
    if (!VM_NAME.test(name)) {
      fieldError(nameInput, "Name: 1–63 characters of a–z, 0–9 and “-”, not starting or ending with “-”.");
      return;
    }
    if (!Number.isInteger(mem) || mem < 128) {
      fieldError(memInput, "Memory: a whole number of MiB, at least 128.");
      return;
    }
    if (!Number.isInteger(vcpus) || vcpus < 1) {
      fieldError(cpuInput, "vCPUs: a whole number, at least 1.");
      return;
    }
    if (image && !VM_NAME.test(image)) {
      fieldError($("start-image"), "Image: a registered image's name (a–z, 0–9 and “-”).");
      return;
    }
    const body = { name, mem_mib: mem, vcpus };
    if (image) body.image = image;
    if (model) body.model = model;
    const button = $("start-submit");
    button.disabled = true;
    button.setAttribute("aria-busy", "true");
    announce(`Starting ${name}…`);
    try {
      const vm = await apiJson("POST", "/api/v1/vms", body);
      if (vm && vm.name) state.vms.set(vm.name, vm);
      state.vmLoaded = true;
      renderVms();
      nameInput.value = "";
      announce(`${name} is ${vm && vm.state ? vm.state : "starting"}.`, "ok");
      selectVm(name, false);
    } catch (e) {
      if (!handleAuth(e)) {
        $("start-error").textContent = `Could not start ${name}: ${errorText(e)}`;
        announce(`Could not start ${name}.`, "error");
      }
    } finally {
      button.disabled = false;
      button.removeAttribute("aria-busy");
    }
    if (state.session) pollers.vms.kick();
  }

  // ---------------------------------------------------------------------------
  // The selected VM's console log

  function selectVm(name, fromClick) {
    state.selectedVm = name;
    const pre = $("console-log");
    pre.textContent = "";
    state.console = name
      ? { vm: name, offset: null, decoder: new TextDecoder("utf-8"), carry: "", chars: 0, bytes: 0, skipToLine: false, epoch: {} }
      : null;
    setText($("console-title"), name ? `Console: ${name}` : "Console");
    pre.setAttribute("aria-label", name ? `Console log of ${name}` : "Console log");
    setText($("console-meta"), "");
    show($("console-hint"), !name);
    show(pre, !!name);
    show($("console-follow").parentElement, !!name);
    for (const row of state.vmRows.values()) {
      const vm = state.vms.get(row.tr.dataset.vm);
      if (vm) updateVmRow(row, vm);
    }
    if (name && fromClick) announce(`Showing the console of ${name}.`);
    if (name && pollers.console) pollers.console.kick();
  }

  /** Console text as plain text: terminal escape sequences and control characters
   *  out (a sequence cut at a chunk's end waits for the next chunk). */
  function cleanConsole(c, text) {
    let t = c.carry + text;
    c.carry = "";
    const cut = /\x1b(?:\[[0-?]*[ -/]*|\][^\x07\x1b]*)?$/.exec(t);
    if (cut && t.length - cut.index < 256) {
      c.carry = cut[0];
      t = t.slice(0, cut.index);
    }
    return t
      .replace(/\x1b\[[0-?]*[ -/]*[@-~]/g, "")
      .replace(/\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)/g, "")
      .replace(/\x1b[@-_]/g, "")
      .replace(/[\x00-\x08\x0b-\x1f\x7f]/g, "");
  }

  function appendConsole(c, text) {
    if (!text) return;
    const pre = $("console-log");
    const follow = $("console-follow").checked;
    if (c.chars + text.length > CONSOLE_MAX) {
      let all = (pre.textContent + text).slice(-CONSOLE_KEEP);
      const nl = all.indexOf("\n");
      if (nl >= 0 && nl < 4096) all = all.slice(nl + 1);
      pre.textContent = "[… older output dropped from this view …]\n" + all;
      c.chars = pre.textContent.length;
    } else {
      pre.append(text);
      c.chars += text.length;
    }
    if (follow) pre.scrollTop = pre.scrollHeight;
  }

  async function pollConsole() {
    const c = state.console;
    if (!c) return false;
    const path = `/api/v1/vms/${enc(c.vm)}/console`;
    try {
      if (c.offset === null) {
        const end = await api("GET", `${path}?offset=${CONSOLE_END}`);
        const len = Number(end.headers.get("x-console-offset"));
        if (state.console !== c) return false;
        c.offset = Number.isFinite(len) && len > CONSOLE_TAIL ? len - CONSOLE_TAIL : 0;
        c.skipToLine = c.offset > 0;
        if (c.skipToLine) appendConsole(c, `[… ${fmtInt(c.offset)} earlier bytes not shown …]\n`);
      }
      for (let i = 0; i < CONSOLE_CHUNKS_PER_TICK; i++) {
        const resp = await api("GET", `${path}?offset=${c.offset}`);
        const next = Number(resp.headers.get("x-console-offset"));
        const bytes = await resp.arrayBuffer();
        if (state.console !== c) return false;
        if (Number.isFinite(next) && next < c.offset) {
          // The log is shorter than what we read: it was started anew.
          appendConsole(c, "\n[— console log restarted —]\n");
          c.decoder = new TextDecoder("utf-8");
          c.carry = "";
          c.offset = 0;
          continue;
        }
        let text = cleanConsole(c, c.decoder.decode(bytes, { stream: true }));
        if (c.skipToLine && text) {
          const nl = text.indexOf("\n");
          if (nl >= 0) {
            text = text.slice(nl + 1);
            c.skipToLine = false;
          } else text = "";
        }
        appendConsole(c, text);
        c.offset = Number.isFinite(next) ? next : c.offset + bytes.byteLength;
        c.bytes = c.offset;
        if (bytes.byteLength < CONSOLE_CHUNK) break;
      }
      setText($("console-meta"), `${fmtInt(c.bytes)} bytes · updated ${fmtClock(new Date())}`);
    } catch (e) {
      if (handleAuth(e)) return false;
      if (state.console === c) setText($("console-meta"), `console unavailable: ${errorText(e)}`);
    }
    return false;
  }

  // ---------------------------------------------------------------------------
  // Usage

  const USAGE_PARTS = [
    { key: "input_tokens", label: "Input", cls: "seg-input" },
    { key: "output_tokens", label: "Output", cls: "seg-output" },
    { key: "cache_creation_input_tokens", label: "Cache writes", cls: "seg-cache-write" },
    { key: "cache_read_input_tokens", label: "Cache reads", cls: "seg-cache-read" },
  ];

  function usageTotal(row) {
    return USAGE_PARTS.reduce((sum, p) => sum + (Number(row[p.key]) || 0), 0);
  }

  function renderUsageTable(rows) {
    const body = $("usage-rows");
    if (!rows.length) {
      body.replaceChildren(el("tr", null, el("td", { colspan: "8", class: "empty" }, "No model requests in this period.")));
      return;
    }
    body.replaceChildren(
      ...rows.map((r) =>
        el(
          "tr",
          null,
          el("th", { scope: "row", class: "mono" }, r.agent),
          el("td", { class: "mono" }, r.model),
          el("td", { class: "num" }, fmtInt(r.requests)),
          el("td", { class: "num" }, fmtInt(r.input_tokens)),
          el("td", { class: "num" }, fmtInt(r.output_tokens)),
          el("td", { class: "num" }, fmtInt(r.cache_creation_input_tokens)),
          el("td", { class: "num" }, fmtInt(r.cache_read_input_tokens)),
          el("td", { class: "num" }, fmtInt(usageTotal(r))),
        ),
      ),
    );
  }

  /** The least round number ≥ `max` that `ticks` equal round steps (1, 1.5, 2, 2.5, 3,
   *  4, 5, 6, 7.5 or 8 × 10^k) reach, so the axis reads 0, 60k, 120k… rather than
   *  0, 56k, 111k… */
  function niceCeiling(max, ticks) {
    const raw = max / ticks;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 1.5, 2, 2.5, 3, 4, 5, 6, 7.5, 8, 10].map((f) => f * mag).find((s) => s >= raw) || 10 * mag;
    return Math.max(step * ticks, ticks);
  }

  /** A horizontal stacked bar per agent and model, largest first. */
  function drawUsageChart(rows) {
    const chart = $("usage-chart");
    const title = $("usage-chart-title");
    const desc = $("usage-chart-desc");
    chart.replaceChildren(title, desc);
    state.usageRows = rows;
    const shown = chart.getBoundingClientRect().width;
    // Drawn at the size it is shown, so its text is the page's size, not scaled.
    const width = shown >= 480 ? Math.round(shown) : 760;
    const labelW = Math.min(260, Math.round(width * 0.3));
    const totalW = 70;
    const barMax = width - labelW - totalW - 10;
    const sorted = rows
      .map((r) => ({ r, total: usageTotal(r) }))
      .sort((a, b) => b.total - a.total)
      .slice(0, CHART_ROWS);
    if (!sorted.length) {
      chart.setAttribute("viewBox", `0 0 ${width} 60`);
      desc.textContent = "No usage recorded.";
      chart.append(svg("text", { x: 10, y: 35, class: "empty-text" }, "No usage recorded in this period."));
      return;
    }
    const ticks = 4;
    const max = niceCeiling(Math.max(1, ...sorted.map((s) => s.total)), ticks);
    const legendH = 30;
    const rowH = 28;
    const axisH = 26;
    const height = legendH + sorted.length * rowH + axisH;
    chart.setAttribute("viewBox", `0 0 ${width} ${height}`);
    const more = rows.length > sorted.length ? ` (the ${sorted.length} largest of ${rows.length})` : "";
    desc.textContent =
      `Stacked bars of tokens for ${sorted.length} agent and model pairs${more}: ` +
      sorted.map((s) => `${s.r.agent} with ${s.r.model}: ${fmtInt(s.total)} tokens`).join("; ") +
      ".";

    // Legend
    let lx = labelW;
    for (const p of USAGE_PARTS) {
      chart.append(svg("rect", { x: lx, y: 8, width: 12, height: 12, class: `seg ${p.cls}` }));
      const t = svg("text", { x: lx + 17, y: 18 }, p.label);
      chart.append(t);
      lx += 17 + p.label.length * 7 + 22;
    }

    // Grid and axis
    const top = legendH;
    const bottom = legendH + sorted.length * rowH;
    for (let i = 0; i <= ticks; i++) {
      const x = labelW + (barMax * i) / ticks;
      chart.append(svg("line", { x1: x, y1: top, x2: x, y2: bottom, class: i === 0 ? "axis" : "grid" }));
      chart.append(
        svg("text", { x, y: bottom + 16, "text-anchor": "middle", class: "axis-label" }, fmtCompact((max * i) / ticks)),
      );
    }

    // Bars
    sorted.forEach((s, i) => {
      const y = top + i * rowH + 5;
      const h = rowH - 10;
      const label = `${s.r.agent} · ${s.r.model}`;
      const g = svg("g", { class: "bar" });
      g.append(svg("title", null, `${label}: ${fmtInt(s.total)} tokens in ${fmtInt(s.r.requests)} requests`));
      g.append(svg("text", { x: labelW - 8, y: y + h - 4, "text-anchor": "end" }, clip(label, Math.max(12, Math.floor((labelW - 12) / 7)))));
      let x = labelW;
      for (const p of USAGE_PARTS) {
        const v = Number(s.r[p.key]) || 0;
        if (v <= 0) continue;
        const w = (barMax * v) / max;
        const seg = svg("rect", { x: x.toFixed(2), y, width: Math.max(w, 0.5).toFixed(2), height: h, class: `seg ${p.cls}` });
        seg.append(svg("title", null, `${label}: ${p.label.toLowerCase()} ${fmtInt(v)}`));
        g.append(seg);
        x += w;
      }
      g.append(svg("text", { x: x + 6, y: y + h - 4, class: "bar-total" }, fmtCompact(s.total)));
      chart.append(g);
    });
  }

  /** The chart and table, hidden while there are no numbers to show. */
  function showUsage(visible) {
    show($("usage-figure"), visible);
    show($("usage-table-wrap"), visible);
  }

  async function pollUsage() {
    const period = Number($("usage-period").value) || 0;
    const since = period ? Date.now() - period : 0;
    const box = $("usage-error");
    try {
      const report = await apiJson("GET", `/api/v1/usage?since_ms=${since}`);
      const rows = report && Array.isArray(report.usage) ? report.usage : [];
      show(box, false);
      showUsage(true);
      renderUsageTable(rows);
      drawUsageChart(rows);
      setText($("usage-updated"), `updated ${fmtClock(new Date())}`);
    } catch (e) {
      if (handleAuth(e)) return;
      box.textContent = `usage unavailable: ${errorText(e)}`;
      show(box, true);
      showUsage(false);
      $("usage-rows").replaceChildren();
    }
  }

  // ---------------------------------------------------------------------------
  // Audit

  function auditRow(e) {
    const kind = String(e.kind || "");
    const isAlert = kind === "alert";
    const isDrops = /drops$/.test(kind);
    const cls = isAlert ? "alert" : isDrops ? "drops" : null;
    const kindCell = el("td");
    if (isAlert) kindCell.append(el("span", { class: "marker marker-alert" }, "ALERT"), " ");
    else if (isDrops) kindCell.append(el("span", { class: "marker marker-drops" }, "LOSS"), " ");
    kindCell.append(kind.replace(/_/g, " "));
    const where = [e.vm, e.agent && e.agent !== e.vm ? e.agent : null].filter(Boolean).join(" / ") || `host ${e.host || ""}`.trim();
    const proc = e.comm ? `${e.comm}${e.pid ? ` (${e.pid})` : ""}` : e.pid ? String(e.pid) : "—";
    let syscall = e.syscall || (e.nr !== undefined ? `#${e.nr}` : "—");
    if (typeof e.ret === "number" && e.ret < 0) syscall += ` = ${e.ret}`;
    let detail = e.path || e.detail || "";
    if (isDrops) {
      const lost = `${fmtInt(e.dropped)} lost${e.dropped_total !== undefined ? ` (${fmtInt(e.dropped_total)} in all)` : ""}`;
      detail = detail ? `${lost}: ${detail}` : lost;
    }
    const ts = String(e.ts || "");
    const short = ts.replace(/^(\d{4}-\d\d-\d\d)T(\d\d:\d\d:\d\d(?:\.\d{1,3})?)\d*(.*)$/, "$1 $2$3");
    return el(
      "tr",
      { class: cls },
      el("td", { class: "num" }, fmtInt(e.seq)),
      el("td", { class: "mono", title: ts }, short),
      kindCell,
      el("td", { class: "num" }, e.severity !== undefined && e.severity !== null ? String(e.severity) : "—"),
      el("td", { class: "mono" }, where),
      el("td", { class: "mono" }, proc),
      el("td", { class: "mono" }, syscall),
      el("td", { class: "mono wrap" }, detail || "—"),
      el("td", null, e.rule || "—"),
    );
  }

  function renderAudit() {
    const a = state.audit;
    if (!a.dirty) return;
    a.dirty = false;
    const alertsOnly = $("audit-alerts-only").checked;
    const list = alertsOnly ? a.alerts : a.events;
    setText($("audit-keep"), alertsOnly ? `${AUDIT_ALERTS_KEEP} alerts` : `${AUDIT_KEEP} events`);
    $("audit-rows").replaceChildren(...list.slice().reverse().map(auditRow));
    show($("audit-empty"), list.length === 0 && a.loaded === true);
    setText(
      $("audit-meta"),
      `${fmtInt(a.total)} events read, ${fmtInt(a.alerts.length)} alerts kept · updated ${fmtClock(new Date())}`,
    );
  }

  async function pollAudit() {
    if ($("audit-paused").checked) return false;
    const a = state.audit;
    const box = $("audit-error");
    let full = false;
    try {
      for (let page = 0; page < AUDIT_PAGES_PER_TICK; page++) {
        const events = await apiJson("GET", `/api/v1/audit/events?after=${a.after}&limit=${AUDIT_PAGE}`);
        if (state.audit !== a) return false;
        const list = Array.isArray(events) ? events : [];
        for (const e of list) {
          if (typeof e.seq === "number" && e.seq > a.after) a.after = e.seq;
          a.events.push(e);
          if (e.kind === "alert") a.alerts.push(e);
        }
        a.total += list.length;
        if (a.events.length > AUDIT_KEEP) a.events.splice(0, a.events.length - AUDIT_KEEP);
        if (a.alerts.length > AUDIT_ALERTS_KEEP) a.alerts.splice(0, a.alerts.length - AUDIT_ALERTS_KEEP);
        if (list.length) a.dirty = true;
        full = list.length >= AUDIT_PAGE;
        if (!full) break;
      }
      if (!a.loaded) a.dirty = true;
      a.loaded = true;
      show(box, false);
      show($("audit-wrap"), true);
    } catch (e) {
      if (handleAuth(e)) return false;
      box.textContent = `audit events unavailable: ${errorText(e)}`;
      show(box, true);
      show($("audit-wrap"), a.events.length > 0);
    }
    renderAudit();
    // Still behind the trail's end: go on soon rather than in a full interval.
    return full;
  }

  // ---------------------------------------------------------------------------
  // Workflows

  function createRunRow(id) {
    const select = el("button", { type: "button", class: "link-button run-select", "aria-pressed": "false" }, clip(id, 24));
    select.setAttribute("title", id);
    select.setAttribute("aria-label", `Show run ${id}`);
    select.addEventListener("click", () => selectRun(id, true));
    const cells = {
      select,
      workflow: el("td", { class: "mono" }),
      state: el("span", { class: "state" }),
      created: el("td"),
      finished: el("td"),
      reason: el("td"),
    };
    const tr = el(
      "tr",
      { "data-run": id },
      el("th", { scope: "row", class: "mono" }, select),
      cells.workflow,
      el("td", null, cells.state),
      cells.created,
      cells.finished,
      cells.reason,
    );
    return { tr, cells };
  }

  function renderRuns() {
    const runs = state.runs
      .slice()
      .sort((a, b) => (b.created_ms || 0) - (a.created_ms || 0))
      .slice(0, RUNS_SHOWN);
    const keep = new Set(runs.map((r) => r.id));
    for (const [id, row] of state.runRows) {
      if (!keep.has(id)) {
        row.tr.remove();
        state.runRows.delete(id);
      }
    }
    const rows = runs.map((run) => {
      let row = state.runRows.get(run.id);
      if (!row) {
        row = createRunRow(run.id);
        state.runRows.set(run.id, row);
      }
      const c = row.cells;
      setText(c.workflow, run.workflow);
      setStateBadge(c.state, run.state);
      setText(c.created, fmtTime(run.created_ms));
      setText(c.finished, fmtTime(run.finished_ms));
      setText(c.reason, run.reason || "");
      const selected = state.selectedRun === run.id;
      c.select.setAttribute("aria-pressed", selected ? "true" : "false");
      row.tr.classList.toggle("selected", selected);
      return row.tr;
    });
    placeRows($("run-rows"), rows);
    show($("runs-empty"), state.runsLoaded === true && runs.length === 0);
  }

  async function pollRuns() {
    const box = $("runs-error");
    try {
      const runs = await apiJson("GET", "/api/v1/runs");
      state.runs = Array.isArray(runs) ? runs : [];
      state.runsLoaded = true;
      show(box, false);
      show($("runs-wrap"), true);
      setText($("runs-updated"), `(updated ${fmtClock(new Date())})`);
    } catch (e) {
      if (handleAuth(e)) return;
      box.textContent = `workflows unavailable: ${errorText(e)}`;
      show(box, true);
      show($("runs-wrap"), state.runs.length > 0);
    }
    renderRuns();
  }

  function selectRun(id, fromClick) {
    state.selectedRun = id;
    state.runFinalSeen = false;
    state.stepNodes.clear();
    $("run-steps").replaceChildren();
    setText($("run-summary"), id ? "Loading…" : "");
    setText($("run-title"), id ? `Run ${id}` : "Run");
    show($("run-detail"), !!id);
    if (id) renderRuns();
    if (id && fromClick) announce(`Showing run ${id}.`);
    if (id && pollers.run) pollers.run.kick();
  }

  /** Map items come as steps of their own (`name[i]`); they are drawn inside their
   *  map step's box when it is there. */
  function groupSteps(steps) {
    const top = [];
    const byId = new Map();
    for (const s of steps) {
      const m = /^(.*)\[(\d+)\]$/.exec(String(s.id));
      const parent = m ? byId.get(m[1]) : null;
      if (parent) parent.items.push(s);
      else {
        const entry = { step: s, items: [] };
        byId.set(String(s.id), entry);
        top.push(entry);
      }
    }
    return top;
  }

  function stepFacts(s) {
    const dl = el("dl");
    const add = (term, value) => {
      if (value === null || value === undefined || value === "") return;
      dl.append(el("dt", null, term), el("dd", null, value));
    };
    add("Attempts", fmtInt(s.attempts));
    add("Duration", s.duration_ms !== undefined ? fmtDuration(s.duration_ms) : s.started_ms ? "running" : null);
    add("Tokens", fmtInt(s.tokens));
    add("VM", s.vm);
    add("Started", s.started_ms ? fmtTime(s.started_ms) : null);
    return dl;
  }

  function createStepNode(id) {
    const li = el("li", { class: "step", "data-step": id });
    const head = el("div", { class: "step-head" });
    const body = el("div", { class: "step-body" });
    li.append(head, body);
    return { li, head, body, approval: null, sig: "" };
  }

  function approvalBlock(runId, stepId) {
    const inputId = `approval-reason-${Math.random().toString(36).slice(2, 10)}`;
    const reason = el("input", { id: inputId, type: "text", maxlength: "500", autocomplete: "off" });
    const approve = el("button", { type: "button", class: "btn btn-small btn-approve step-approve" }, "Approve");
    const reject = el("button", { type: "button", class: "btn btn-small btn-danger step-reject" }, "Reject");
    approve.setAttribute("aria-label", `Approve step ${stepId}`);
    reject.setAttribute("aria-label", `Reject step ${stepId}`);
    const decide = async (approved) => {
      approve.disabled = true;
      reject.disabled = true;
      const body = { approved };
      const why = reason.value.trim();
      if (why) body.reason = why;
      try {
        await api("POST", `/api/v1/runs/${enc(runId)}/steps/${enc(stepId)}/approval`, body);
        announce(`Step ${stepId} ${approved ? "approved" : "rejected"}.`, "ok");
      } catch (e) {
        if (!handleAuth(e)) announce(`Could not record the decision on ${stepId}: ${errorText(e)}`, "error");
      } finally {
        approve.disabled = false;
        reject.disabled = false;
      }
      if (state.session && pollers.run) pollers.run.kick();
    };
    approve.addEventListener("click", () => decide(true));
    reject.addEventListener("click", () => decide(false));
    return el(
      "div",
      { class: "approval", role: "group", "aria-label": `Approval of ${stepId}` },
      el("label", { for: inputId }, "Reason (optional)"),
      reason,
      el("div", { class: "row" }, approve, reject),
    );
  }

  function renderRun(run) {
    const steps = Array.isArray(run.steps) ? run.steps : [];
    const parts = [`${run.workflow || "workflow"} — ${run.state}`];
    parts.push(`created ${fmtTime(run.created_ms)}`);
    if (run.finished_ms) parts.push(`finished ${fmtTime(run.finished_ms)}`);
    if (run.reason) parts.push(`reason: ${run.reason}`);
    const summary = $("run-summary");
    summary.replaceChildren(stateBadge(run.state), " ", parts.join(" · "));

    const list = $("run-steps");
    const groups = groupSteps(steps);
    const seen = new Set();
    const nodes = groups.map(({ step: s, items }) => {
      const id = String(s.id);
      seen.add(id);
      let node = state.stepNodes.get(id);
      if (!node) {
        node = createStepNode(id);
        state.stepNodes.set(id, node);
      }
      node.li.setAttribute("class", `step step-border-${/^[a-z_]+$/.test(s.state) ? s.state : "unknown"}`);
      const sig = JSON.stringify([s, items]);
      if (sig !== node.sig) {
        node.sig = sig;
        node.head.replaceChildren(
          el("span", { class: "step-id" }, id),
          el("span", { class: "step-kind" }, s.kind),
        );
        const body = [stateBadge(s.state), stepFacts(s)];
        if (items.length) {
          body.push(
            el(
              "ul",
              { class: "step-items", "aria-label": `Items of ${id}` },
              ...items.map((it) => el("li", null, el("span", { class: "mono" }, it.id), stateBadge(it.state))),
            ),
          );
        }
        if (s.error) body.push(el("pre", { class: "step-text step-error" }, `error: ${s.error}`));
        if (s.output) body.push(el("pre", { class: "step-text" }, s.output));
        node.body.replaceChildren(...body);
      }
      const waiting = s.kind === "approval" && s.state === "waiting" && canOperate();
      if (waiting && !node.approval) {
        node.approval = approvalBlock(run.id, id);
        node.li.append(node.approval);
      } else if (!waiting && node.approval) {
        node.approval.remove();
        node.approval = null;
      }
      return node.li;
    });
    for (const id of [...state.stepNodes.keys()]) {
      if (!seen.has(id)) state.stepNodes.delete(id);
    }
    placeRows(list, nodes);
  }

  async function pollRun() {
    const id = state.selectedRun;
    if (!id) return false;
    if (state.runFinalSeen) return false;
    try {
      const run = await apiJson("GET", `/api/v1/runs/${enc(id)}`);
      if (state.selectedRun !== id) return false;
      renderRun(run);
      // A finished run changes no more: stop asking until it is selected again.
      if (run.state && run.state !== "running") state.runFinalSeen = true;
    } catch (e) {
      if (handleAuth(e)) return false;
      if (state.selectedRun === id) setText($("run-summary"), `run unavailable: ${errorText(e)}`);
    }
    return false;
  }

  // ---------------------------------------------------------------------------
  // Start

  function init() {
    pollers.vms = new Poller(VM_POLL_MS, pollVms, () => state.section === "vms");
    pollers.console = new Poller(CONSOLE_POLL_MS, pollConsole, () => state.section === "vms" && !!state.console);
    pollers.usage = new Poller(USAGE_POLL_MS, pollUsage, () => state.section === "usage");
    pollers.audit = new Poller(AUDIT_POLL_MS, pollAudit, () => state.section === "audit");
    pollers.runs = new Poller(RUNS_POLL_MS, pollRuns, () => state.section === "workflows");
    pollers.run = new Poller(RUN_POLL_MS, pollRun, () => state.section === "workflows" && !!state.selectedRun);

    $("login-form").addEventListener("submit", login);
    $("login-token").addEventListener("input", () => $("login-token").removeAttribute("aria-invalid"));
    $("logout").addEventListener("click", () => logout());
    $("start-form").addEventListener("submit", startVm);
    $("usage-form").addEventListener("submit", (e) => {
      e.preventDefault();
      pollers.usage.kick();
    });
    $("usage-period").addEventListener("change", () => pollers.usage.kick());
    $("audit-alerts-only").addEventListener("change", () => {
      state.audit.dirty = true;
      renderAudit();
    });
    $("audit-paused").addEventListener("change", () => pollers.audit.kick());
    $("console-follow").addEventListener("change", (e) => {
      if (e.currentTarget.checked) {
        const pre = $("console-log");
        pre.scrollTop = pre.scrollHeight;
      }
    });
    window.addEventListener("hashchange", onHashChange);
    let resizeTimer = null;
    window.addEventListener("resize", () => {
      clearTimeout(resizeTimer);
      resizeTimer = setTimeout(() => {
        if (state.session && state.section === "usage" && state.usageRows) drawUsageChart(state.usageRows);
      }, 200);
    });
    document.addEventListener("visibilitychange", () => {
      if (document.visibilityState === "visible" && state.session) startPollers();
    });
    for (const type of ["pointerdown", "keydown", "wheel", "touchstart"]) {
      document.addEventListener(type, noteActivity, { passive: true, capture: true });
    }
    setInterval(checkIdle, IDLE_CHECK_MS);

    resumeSession();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
