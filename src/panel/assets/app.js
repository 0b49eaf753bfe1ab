// bootfleet panel: a small single-page app over /api/v1 (no build step,
// no external assets). Every value from the network is put into the page
// as text (textContent), never as HTML: iPXE facts come from machines.
"use strict";

const state = { csrf: null, user: null, scope: null, images: [], streams: [] };
const ROW_LIMIT = 1000;

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function flash(message, isError) {
  const el = document.getElementById("flash");
  el.textContent = message;
  el.className = isError ? "error" : "";
  el.hidden = false;
  clearTimeout(flash.timer);
  flash.timer = setTimeout(() => { el.hidden = true; }, isError ? 8000 : 4000);
}

async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (method !== "GET" && state.csrf) headers["X-CSRF-Token"] = state.csrf;
  const res = await fetch("/api/v1" + path, {
    method, headers, credentials: "same-origin",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (res.status === 401 && path !== "/login") { showLogin(); throw new Error("please log in"); }
  const text = await res.text();
  const data = text ? JSON.parse(text) : null;
  if (!res.ok) throw new Error((data && data.error) || res.statusText);
  return data;
}

// A GET of a paged list: its items and the whole count.
async function apiPage(path) {
  const res = await fetch("/api/v1" + path, { credentials: "same-origin" });
  if (res.status === 401) { showLogin(); throw new Error("please log in"); }
  const data = await res.json();
  if (!res.ok) throw new Error(data.error || res.statusText);
  return { data, total: Number(res.headers.get("x-total-count") || data.length) };
}

function when(ms) {
  if (!ms) return "—";
  const s = Math.round((Date.now() - ms) / 1000);
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return new Date(ms).toLocaleString();
}

function size(bytes) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (bytes >= 1024 && i < units.length - 1) { bytes /= 1024; i++; }
  return (i ? bytes.toFixed(1) : bytes) + " " + units[i];
}

function badge(text, extra) {
  return h("span", { class: "badge " + text + (extra ? " " + extra : "") }, text);
}

function closeStreams() {
  for (const s of state.streams) s.close();
  state.streams = [];
}

function showLogin() {
  closeStreams();
  document.getElementById("login").hidden = false;
  document.getElementById("nav").hidden = true;
  document.getElementById("logout").hidden = true;
  document.getElementById("who").textContent = "";
  document.getElementById("view").replaceChildren();
}

async function start() {
  document.getElementById("login").addEventListener("submit", async (e) => {
    e.preventDefault();
    try {
      const s = await api("POST", "/login", {
        user: document.getElementById("login-user").value,
        password: document.getElementById("login-password").value,
      });
      document.getElementById("login-password").value = "";
      loggedIn(s);
    } catch (err) { flash(err.message, true); }
  });
  document.getElementById("logout").addEventListener("click", async () => {
    try { await api("POST", "/logout"); } catch (_) { /* already out */ }
    state.csrf = null;
    showLogin();
  });
  window.addEventListener("hashchange", route);
  try { loggedIn(await api("GET", "/session")); } catch (_) { showLogin(); }
}

function loggedIn(s) {
  state.csrf = s.csrf; state.user = s.user; state.scope = s.scope;
  document.getElementById("login").hidden = true;
  document.getElementById("nav").hidden = false;
  document.getElementById("logout").hidden = false;
  document.getElementById("who").textContent = s.user + " (" + s.scope + ")";
  document.getElementById("nav-tokens").hidden = s.scope !== "admin";
  if (!location.hash || location.hash === "#/") location.hash = "#/machines";
  else route();
}

async function route() {
  if (!state.csrf && !state.user) return;
  closeStreams();
  const hash = location.hash.slice(1) || "/machines";
  for (const a of document.querySelectorAll("#nav a")) {
    a.classList.toggle("active", hash.startsWith(a.getAttribute("href").slice(1)));
  }
  const view = document.getElementById("view");
  try {
    state.images = await api("GET", "/images");
    const discovered = await api("GET", "/discovered");
    document.getElementById("discovered-count").textContent = discovered.length || "";
    let page;
    if (hash.startsWith("/machine/")) page = await machinePage(decodeURIComponent(hash.slice(9)));
    else if (hash === "/fleet") page = await fleetPage();
    else if (hash === "/discovered") page = discoveredPage(discovered, await unknownPolicyForm());
    else if (hash === "/images") page = await imagesPage();
    else if (hash === "/pools") page = await poolsPage();
    else if (hash === "/audit") page = await auditPage();
    else if (hash === "/tokens") page = await tokensPage();
    else if (hash.startsWith("/power/")) page = await powerJobPage(hash.slice(7));
    else if (hash === "/power") page = await powerJobsPage();
    else page = await machinesPage();
    view.replaceChildren(page);
    // When the page was painted (the panel benchmark reads it).
    requestAnimationFrame(() => requestAnimationFrame(() => { window.bfPaintedAt = performance.now(); }));
  } catch (err) { flash(err.message, true); }
}

function imageSelect(id, withNone) {
  return h("select", { id },
    withNone ? h("option", { value: "" }, "— no image —") : null,
    state.images.map((i) => h("option", { value: i.name }, i.name)));
}

// The bulk action's image: nothing chosen at first, and unassigning is a
// choice of its own, never what an untouched selector does.
function bulkImageSelect(id) {
  return h("select", { id },
    h("option", { value: "", disabled: true, selected: true }, "choose an image…"),
    state.images.map((i) => h("option", { value: i.name }, i.name)),
    h("option", { value: "none" }, "no image (unassign)"));
}

function selectedMacs(table) {
  return [...table.querySelectorAll("tbody input[type=checkbox]:checked")].map((c) => c.value);
}

function checkAll(table) {
  return h("input", { type: "checkbox", title: "select all shown", onchange: (e) => {
    for (const c of table.querySelectorAll("tbody input[type=checkbox]")) c.checked = e.target.checked;
  } });
}

// ---- machines ----

async function machinesPage() {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const filter = {
    q: params.get("q") || "", state: params.get("state") || "",
    image: params.get("image") || "", label: params.get("label") || "",
  };
  const query = new URLSearchParams(Object.entries(filter).filter(([, v]) => v));
  query.set("limit", ROW_LIMIT);
  const { data: machines, total } = await apiPage("/machines?" + query);
  const table = h("table", { id: "machines" });
  const apply = () => {
    const q = new URLSearchParams();
    for (const k of ["q", "state", "image", "label"]) {
      const v = document.getElementById("filter-" + k).value.trim();
      if (v) q.set(k, v);
    }
    location.hash = "#/machines" + (q.toString() ? "?" + q : "");
  };
  const states = ["", "assigned", "unassigned", "dhcp", "loader", "chain", "script", "kernel", "initrd", "booted", "failed", "local", "discovered"];
  const toolbar = h("div", { class: "toolbar" },
    h("input", { id: "filter-q", type: "search", placeholder: "search MAC, name, IP, serial…", value: filter.q,
      onkeydown: (e) => { if (e.key === "Enter") apply(); } }),
    h("select", { id: "filter-state", onchange: apply },
      states.map((s) => h("option", { value: s, selected: s === filter.state }, s || "any state"))),
    h("select", { id: "filter-image", onchange: apply },
      h("option", { value: "" }, "any image"),
      state.images.map((i) => h("option", { value: i.name, selected: i.name === filter.image }, i.name))),
    h("input", { id: "filter-label", placeholder: "label key=value", value: filter.label,
      onkeydown: (e) => { if (e.key === "Enter") apply(); } }),
    h("button", { class: "secondary", onclick: apply }, "Filter"));
  const actions = h("div", { class: "toolbar" },
    "Selected:", bulkImageSelect("assign-image"),
    h("button", { id: "assign-button", onclick: async () => {
      const macs = selectedMacs(table);
      if (!macs.length) return flash("select machines first", true);
      const chosen = document.getElementById("assign-image").value;
      if (!chosen) return flash("choose an image (or “no image”) first", true);
      const image = chosen === "none" ? null : chosen;
      const question = image ? `Assign ${image} to ${macs.length} machine(s)? They boot it from their next script.`
        : `Unassign ${macs.length} machine(s)? They boot no image of their own (their pool's, if any).`;
      if (!confirm(question)) return;
      try {
        const r = await api("POST", "/machines/assign", { macs, image });
        flash(`${r.changed} machine(s) now boot ${image || "nothing"}`);
        route();
      } catch (err) { flash(err.message, true); }
    } }, "Assign image"),
    h("input", { id: "assign-pool", placeholder: "pool name" }),
    h("button", { id: "pool-add-button", class: "secondary", onclick: async () => {
      const macs = selectedMacs(table);
      const pool = document.getElementById("assign-pool").value.trim();
      if (!macs.length || !pool) return flash("select machines and name a pool", true);
      try {
        await api("POST", "/machines/assign", { macs, pool });
        flash(`${macs.length} machine(s) added to pool ${pool}`);
        route();
      } catch (err) { flash(err.message, true); }
    } }, "Add to pool"));
  const power = h("div", { class: "toolbar" }, "Power selected:", wavesSelect("power-waves"),
    ["on", "cycle", "off"].map((action) => h("button", { id: "power-" + action, class: action === "on" ? "" : "secondary",
      onclick: () => startPower({ macs: selectedMacs(table) }, action, "power-waves") }, "Power " + action)));
  table.append(
    h("thead", {}, h("tr", {}, h("th", {}, checkAll(table)),
      ["MAC", "Hostname", "IP", "Image", "Labels", "State", "Last seen"].map((t) => h("th", {}, t)))),
    h("tbody", {}, machines.map(machineRow)));
  return h("div", {},
    h("h1", {}, "Machines"), toolbar, actions, power,
    h("p", { class: "muted", id: "machine-count" },
      total > machines.length ? `showing ${machines.length} of ${total}; narrow the filter to see the rest`
        : `${total} machine(s)`),
    table);
}

function machineRow(v) {
  return h("tr", { dataset: { mac: v.mac } },
    h("td", {}, h("input", { type: "checkbox", value: v.mac })),
    h("td", { class: "mono" }, h("a", { href: "#/machine/" + encodeURIComponent(v.mac) }, v.mac)),
    h("td", {}, v.hostname || ""),
    h("td", { class: "mono" }, v.ip || ""),
    h("td", {}, v.image || "—", v.image_from && v.image_from !== "machine"
      ? h("span", { class: "muted" }, ` (${v.image_from})`) : null),
    h("td", {}, (v.labels || []).join(", ")),
    h("td", { title: v.failure || "" }, badge(v.state), v.stuck ? badge("stuck") : null),
    h("td", {}, when(v.last_seen_ms)));
}

// ---- discovered ----

async function unknownPolicyForm() {
  const setting = await api("GET", "/settings/unknown");
  const policy = h("select", { id: "unknown-policy" },
    [["menu", "a menu of the images"], ["wait", "wait for an assignment"], ["local", "their local disk"]]
      .map(([v, t]) => h("option", { value: v, selected: v === setting.policy }, t)));
  const poll = h("input", { id: "unknown-poll", type: "number", min: 1, max: 3600, value: setting.poll_seconds, size: 5 });
  return h("form", { class: "toolbar", id: "unknown-form", onsubmit: async (e) => {
    e.preventDefault();
    try {
      await api("PUT", "/settings/unknown", { policy: policy.value, poll_seconds: Number(poll.value) });
      flash("unknown machines now get " + policy.options[policy.selectedIndex].text);
    } catch (err) { flash(err.message, true); }
  } }, "Machines not in the inventory boot", policy, "asking again every", poll, "s",
    h("button", { type: "submit", class: "secondary" }, "Save"));
}

// A fact as a machine sent it: cut to the column's width with the whole
// value on hover (one long value must not widen the page); a missing one
// is a dash that does not look like data.
function factCell(value) {
  return value ? h("td", { class: "fact", title: value }, value) : h("td", {}, placeholder());
}

function placeholder() {
  return h("span", { class: "placeholder", "aria-label": "none" }, "—");
}

function discoveredPage(machines, policyForm) {
  const table = h("table", { id: "discovered" });
  const facts = ["manufacturer", "product", "serial", "uuid", "platform", "buildarch"];
  table.append(
    h("thead", {}, h("tr", {}, h("th", {}, checkAll(table)),
      ["MAC", ...facts, "First seen", "Last seen"].map((t) => h("th", {}, t)))),
    h("tbody", {}, machines.map((m) => h("tr", { dataset: { mac: m.mac } },
      h("td", {}, h("input", { type: "checkbox", value: m.mac })),
      h("td", { class: "mono" }, m.mac),
      facts.map((f) => factCell(m.facts[f])),
      h("td", {}, when(m.first_seen_ms)), h("td", {}, when(m.last_seen_ms))))));
  return h("div", {},
    h("h1", {}, "Discovered machines"),
    h("p", { class: "muted" }, "Machines that asked for their script but are not in the inventory. Adopt them to choose what they boot."),
    policyForm,
    h("div", { class: "toolbar" }, "Adopt selected with", imageSelect("adopt-image", true),
      h("button", { id: "adopt-button", onclick: async () => {
        const macs = selectedMacs(table);
        if (!macs.length) return flash("select machines first", true);
        const image = document.getElementById("adopt-image").value || null;
        try {
          await api("POST", "/machines/assign", { macs, image });
          flash(`adopted ${macs.length} machine(s)` + (image ? `; they boot ${image}` : ""));
          route();
        } catch (err) { flash(err.message, true); }
      } }, "Adopt")),
    machines.length ? table : h("p", {}, "None waiting."));
}

// ---- one machine ----

async function machinePage(mac) {
  const m = await api("GET", "/machines/" + encodeURIComponent(mac));
  const rows = h("tbody", {}, m.events.map(eventRow));
  const stream = new EventSource("/api/v1/events/stream?mac=" + encodeURIComponent(m.mac));
  stream.addEventListener("boot", (e) => rows.append(eventRow(JSON.parse(e.data))));
  state.streams.push(stream);
  const facts = Object.entries(m.facts || {});
  const image = imageSelect("machine-image", true);
  // Its own assignment only: an image it boots through a pool is not
  // saved as its own.
  image.value = m.image_from === "machine" ? m.image : "";
  const input = (id, value, attrs) => h("input", { id, value: value || "", ...attrs });
  const check = (id, on) => h("input", { id, type: "checkbox", checked: on });
  const save = async (e) => {
    e.preventDefault();
    const v = (id) => document.getElementById(id).value.trim();
    try {
      await api("PUT", "/machines/" + encodeURIComponent(m.mac), {
        image: image.value || null,
        hostname: v("machine-hostname") || null,
        ip: v("machine-ip") || null,
        labels: v("machine-labels").split(/[\s,]+/).filter(Boolean),
        cmdline_append: v("machine-cmdline"),
        notes: v("machine-notes"),
        one_shot: document.getElementById("machine-one-shot").checked,
        netboot: document.getElementById("machine-netboot").checked,
      });
      flash("saved; the machine's next script uses it"); route();
    } catch (err) { flash(err.message, true); }
  };
  return h("div", {},
    h("h1", {}, "Machine ", h("span", { class: "mono" }, m.mac), " ", badge(m.state), m.stuck ? badge("stuck") : null),
    m.failure ? h("p", { class: "failure" }, m.failure) : null,
    h("form", { id: "machine-form", onsubmit: save },
      h("dl", { class: "grid" },
        h("dt", {}, "Image"), h("dd", {}, image, m.image_from && m.image_from !== "machine"
          ? h("span", { class: "muted" }, ` boots ${m.image} from ${m.image_from} unless given one`) : null),
        h("dt", {}, "Hostname"), h("dd", {}, input("machine-hostname", m.hostname, { placeholder: "node01" })),
        h("dt", {}, "Reserved IP"), h("dd", {}, input("machine-ip", m.ip, { placeholder: "10.0.0.11" })),
        h("dt", {}, "Labels"), h("dd", {}, input("machine-labels", (m.labels || []).join(" "), { placeholder: "rack=r1 role=compute", size: 40 })),
        h("dt", {}, "Command line additions"), h("dd", {}, input("machine-cmdline", m.cmdline_append, { size: 40 })),
        h("dt", {}, "Notes"), h("dd", {}, input("machine-notes", m.notes, { size: 40 })),
        h("dt", {}, "Netboot"), h("dd", {}, check("machine-netboot", m.netboot), " boots from the network (off: its local disk)"),
        h("dt", {}, "One-shot"), h("dd", {}, check("machine-one-shot", m.one_shot),
          m.one_shot ? ` generation ${m.rearm} ` : " ",
          m.one_shot ? h("button", { type: "button", class: "secondary", onclick: async () => {
            try { await api("PUT", "/machines/" + encodeURIComponent(m.mac), { rearm: true }); flash("re-armed"); route(); }
            catch (err) { flash(err.message, true); }
          } }, "Re-arm") : null),
        h("dt", {}, ""), h("dd", {}, h("button", { id: "machine-save", type: "submit" }, "Save")),
        h("dt", {}, "First / last seen"), h("dd", {}, when(m.first_seen_ms) + " / " + when(m.last_seen_ms)),
        facts.map(([k, val]) => [h("dt", {}, k), h("dd", { class: "mono wrap" }, val)]))),
    h("h2", {}, "BMC"),
    h("form", { id: "bmc-form", class: "toolbar", onsubmit: async (e) => {
      e.preventDefault();
      try {
        const kg = document.getElementById("bmc-kg").value;
        const r = await api("PUT", "/machines/" + encodeURIComponent(m.mac) + "/bmc", {
          url: document.getElementById("bmc-url").value.trim(),
          password: document.getElementById("bmc-password").value,
          kg_key: kg === "" ? null : kg });
        flash("BMC " + r.bmc + " saved (its password" + (kg === "" ? " is" : " and K_g key are") + " sealed, never shown)"); route();
      } catch (err) { flash(err.message, true); }
    } },
      input("bmc-url", m.bmc, { placeholder: "redfish://USER@HOST/redfish/v1/Systems/1 or ipmi://USER@HOST", size: 50 }),
      h("input", { id: "bmc-password", type: "password", placeholder: "password", autocomplete: "off", required: true }),
      h("input", { id: "bmc-kg", type: "password", placeholder: "IPMI K_g key (if any)", autocomplete: "off",
        title: "an IPMI BMC's K_g key: its characters, or 0x and hex digits; leave empty if the BMC has none" }),
      h("button", { type: "submit", class: "secondary" }, "Set BMC")),
    m.bmc ? h("div", { class: "toolbar" }, "Power:", h("input", { id: "machine-waves", type: "hidden", value: "all" }),
      ["on", "cycle", "off", "status"].map((action) => h("button", { class: "secondary",
        onclick: () => startPower({ macs: [m.mac] }, action, "machine-waves") }, action))) : null,
    h("h2", {}, "Boot timeline (live)"),
    h("table", { id: "timeline" },
      h("thead", {}, h("tr", {}, ["When", "Step", "Via", "What", "Bytes", "ms", "Status"].map((t) => h("th", {}, t)))),
      rows));
}

function eventRow(e) {
  return h("tr", {},
    h("td", {}, new Date(e.at_ms).toLocaleTimeString()),
    h("td", {}, badge(e.phase, e.status >= 400 ? "failed" : "")),
    // Stored events name the server that served them (several may share
    // one database).
    h("td", {}, e.server ? e.transport + " @ " + e.server : e.transport), h("td", { class: "mono" }, e.detail),
    h("td", {}, e.bytes ? size(e.bytes) : ""), h("td", {}, e.duration_ms), h("td", {}, e.status));
}

// ---- fleet ----

async function fleetPage() {
  const box = h("div", { id: "fleet" });
  const render = (f) => {
    const order = ["assigned", "dhcp", "loader", "chain", "script", "loader-config", "kernel", "initrd", "booted", "failed", "unassigned", "local", "discovered"];
    const counts = f.states || {};
    const total = f.machines || 1;
    box.replaceChildren(
      h("p", { class: "muted" }, `${f.machines} machines · updated ${new Date(f.at_ms).toLocaleTimeString()} · stuck = no progress for ${f.stuck_after_seconds} s`),
      h("div", { class: "phases" }, order.filter((s) => counts[s]).map((s) => {
        const bar = h("div", {});
        bar.style.width = Math.round(100 * counts[s] / total) + "%";
        return h("div", { class: "phase", dataset: { state: s } }, h("div", { class: "n" }, counts[s]), badge(s), h("div", { class: "bar" }, bar));
      })),
      ...(Object.keys(f.failures || {}).length ? [
        h("h2", {}, "Failures by cause"),
        h("table", { id: "failures" },
          h("thead", {}, h("tr", {}, ["Where and why", "Machines"].map((t) => h("th", {}, t)))),
          h("tbody", {}, Object.entries(f.failures).map(([cause, n]) => h("tr", {}, h("td", {}, cause), h("td", {}, String(n))))))] : []),
      h("h2", {}, `Stuck (${f.stuck.length})`),
      f.stuck.length ? h("table", { id: "stuck" },
        h("thead", {}, h("tr", {}, ["MAC", "Hostname", "Stopped at", "Since", "Status"].map((t) => h("th", {}, t)))),
        h("tbody", {}, f.stuck.map((s) => h("tr", {},
          h("td", { class: "mono" }, h("a", { href: "#/machine/" + encodeURIComponent(s.mac) }, s.mac)),
          h("td", {}, s.hostname || ""), h("td", {}, badge(s.state)), h("td", {}, when(s.since_ms)), h("td", {}, s.status ?? "")))))
        : h("p", {}, "No machine is stuck."));
  };
  render(await api("GET", "/fleet"));
  const stream = new EventSource("/api/v1/fleet/stream");
  stream.addEventListener("fleet", (e) => render(JSON.parse(e.data)));
  state.streams.push(stream);
  return h("div", {}, h("h1", {}, "Fleet (live)"), box);
}

// ---- images ----

async function imagesPage() {
  const [files, ipxe] = await Promise.all([api("GET", "/files"), api("GET", "/ipxe")]);
  const table = h("table", { id: "images" },
    h("thead", {}, h("tr", {}, ["Name", "Rev.", "Kernel", "Initrds", "Command line", "Via", "Files (size, SHA-256)", "On servers", ""].map((t) => h("th", {}, t)))),
    h("tbody", {}, state.images.map((i) => h("tr", { dataset: { image: i.name } },
      h("td", {}, i.name, i.problem ? [" ", h("span", { class: "badge failed", title: i.problem }, "broken")] : null,
        i.secure_boot ? [" ", h("span", { class: "badge " + (i.warning ? "failed" : "booted"), title: "booted through signed shim and GRUB on UEFI x64 PXE machines" }, "Secure Boot")] : null,
        i.problem ? h("div", { class: "failure" }, i.problem) : null,
        i.warning ? h("div", { class: "failure secure-boot-warning" }, i.warning) : null),
      h("td", { class: "revision" }, i.revision),
      h("td", { class: "mono" }, i.kernel, i.kernel_signature ? h("div", { class: "muted" }, i.kernel_signature) : null),
      h("td", { class: "mono" }, i.initrds.join(" ")),
      h("td", { class: "mono" }, i.cmdline), h("td", {}, i.secure_boot ? "tftp (Secure Boot)" : i.transport),
      h("td", {}, i.files.map((f) => h("div", { class: "mono", title: f.sha256 }, `${f.path}: ${size(f.size)}, ${f.sha256.slice(0, 12)}…`))),
      // Which servers of the database hold the image's files (copied
      // between them by SHA-256); a server that stopped reporting is greyed.
      h("td", { class: "servers" }, (i.servers || []).map((s) => h("span", {
        class: "badge " + (s.holds ? "booted" : "discovered") + (s.running ? "" : " muted"),
        title: (s.holds ? "holds the files" : "copying or lacking the files") + (s.running ? "" : "; not running"),
      }, (s.holds ? "✓ " : "… ") + s.name))),
      h("td", {}, h("button", { class: "secondary edit", onclick: () => imageEditor(i.name) }, "Edit"), " ",
        h("button", { class: "secondary", onclick: async () => {
          if (!confirm(`Remove image ${i.name}? Its revisions go with it; its files stay in the boot directory.`)) return;
          try { await api("DELETE", "/images/" + encodeURIComponent(i.name)); flash("removed " + i.name); route(); }
          catch (err) { flash(err.message, true); }
        } }, "Remove"))))));
  const list = h("datalist", { id: "boot-files" }, files.map((f) => h("option", { value: f.path }, `${f.path} (${size(f.size)})`)));
  const field = (id, label, attrs) => h("label", {}, label + " ", h("input", { id, list: "boot-files", ...attrs }));
  const register = h("form", { class: "toolbar", id: "register-image", onsubmit: async (e) => {
    e.preventDefault();
    const v = (id) => document.getElementById(id).value.trim();
    try {
      const image = await api("POST", "/images", {
        name: v("image-name"), kernel: v("image-kernel"),
        initrds: v("image-initrds").split(/\s+/).filter(Boolean), cmdline: v("image-cmdline"),
        transport: v("image-transport"), secure_boot: document.getElementById("image-secure-boot").checked,
      });
      flash(`registered ${image.name}`); route();
    } catch (err) { flash(err.message, true); }
  } },
    h("label", {}, "Name ", h("input", { id: "image-name", required: true, size: 12 })),
    field("image-kernel", "Kernel", { required: true }), field("image-initrds", "Initrds (space-separated)", {}),
    h("label", {}, "Command line ", h("input", { id: "image-cmdline", size: 30 })),
    h("select", { id: "image-transport" }, ["http", "tftp", "multicast"].map((t) => h("option", { value: t }, t))),
    h("label", { title: "UEFI x64 PXE machines boot it through signed shim and GRUB; the kernel must be signed" },
      h("input", { type: "checkbox", id: "image-secure-boot" }), " Secure Boot"),
    h("button", { type: "submit" }, "Register"));
  const progress = h("progress", { id: "upload-progress", max: 100, value: 0, hidden: true });
  const upload = h("div", { class: "toolbar" },
    h("input", { type: "file", id: "upload-file" }),
    h("input", { id: "upload-dir", placeholder: "directory in the boot dir, e.g. debian12" }),
    h("button", { id: "upload-button", class: "secondary", onclick: () => {
      const file = document.getElementById("upload-file").files[0];
      if (!file) return flash("choose a file", true);
      const dir = document.getElementById("upload-dir").value.trim().replace(/^\/+|\/+$/g, "");
      const path = (dir ? dir + "/" : "") + file.name;
      const xhr = new XMLHttpRequest();
      xhr.open("PUT", "/api/v1/files/" + path.split("/").map(encodeURIComponent).join("/"));
      xhr.setRequestHeader("X-CSRF-Token", state.csrf);
      progress.hidden = false;
      xhr.upload.onprogress = (e) => { if (e.lengthComputable) progress.value = Math.round(100 * e.loaded / e.total); };
      xhr.onload = () => {
        progress.hidden = true;
        if (xhr.status === 201) { flash("uploaded " + path); route(); }
        else flash(JSON.parse(xhr.responseText || "{}").error || xhr.statusText, true);
      };
      xhr.onerror = () => { progress.hidden = true; flash("upload failed", true); };
      xhr.send(file);
    } }, "Upload"), progress);
  return h("div", {}, h("h1", {}, "Images"), table, h("div", { id: "image-editor" }),
    h("h2", {}, "Register an image"), list, register,
    h("h2", {}, "Upload a file into the boot directory"), upload,
    h("h2", {}, "iPXE built for this server"), ipxeBuilds(ipxe));
}

// Editing an image: every save is a new revision, which every machine not
// pinned to a revision boots from its next script; any earlier revision
// comes back with one (confirmed) click.
async function imageEditor(name) {
  const box = document.getElementById("image-editor");
  const path = "/images/" + encodeURIComponent(name);
  let image, revisions;
  try { [image, revisions] = await Promise.all([api("GET", path), api("GET", path + "/revisions")]); }
  catch (err) { return flash(err.message, true); }
  // After a save: the Images page afresh, the editor open on the image.
  const reopen = async (message) => {
    flash(message);
    await route();
    await imageEditor(name);
  };
  const input = (id, label, value, attrs) => h("label", {}, label + " ", h("input", { id, value, list: "boot-files", ...attrs }));
  const form = h("form", { class: "toolbar", id: "edit-image", onsubmit: async (e) => {
    e.preventDefault();
    const v = (id) => document.getElementById(id).value.trim();
    try {
      const saved = await api("PUT", path, {
        kernel: v("edit-kernel"), initrds: v("edit-initrds").split(/\s+/).filter(Boolean),
        cmdline: v("edit-cmdline"), transport: v("edit-transport"),
        secure_boot: document.getElementById("edit-secure-boot").checked,
      });
      await reopen(saved.revision === image.revision ? `${name}: nothing changed` : `${name}: revision ${saved.revision} saved`);
    } catch (err) { flash(err.message, true); }
  } },
    input("edit-kernel", "Kernel", image.kernel, { required: true }),
    input("edit-initrds", "Initrds", image.initrds.join(" "), {}),
    h("label", {}, "Command line ", h("input", { id: "edit-cmdline", value: image.cmdline, size: 40 })),
    h("select", { id: "edit-transport" }, ["http", "tftp", "multicast"].map((t) => h("option", { value: t, selected: t === image.transport }, t))),
    h("label", {}, h("input", { type: "checkbox", id: "edit-secure-boot", checked: image.secure_boot }), " Secure Boot"),
    h("button", { type: "submit" }, "Save as revision " + (image.revision + 1)),
    h("button", { type: "button", class: "secondary", onclick: () => box.replaceChildren() }, "Close"));
  const history = h("table", { id: "image-revisions" },
    h("thead", {}, h("tr", {}, ["Revision", "When", "By", "What changed", ""].map((t) => h("th", {}, t)))),
    h("tbody", {}, revisions.map((r) => h("tr", { dataset: { revision: r.revision } },
      h("td", {}, r.revision, r.revision === image.revision ? h("span", { class: "badge booted" }, " current") : null),
      h("td", {}, when(r.at_ms)), h("td", {}, r.actor || h("span", { class: "muted" }, "unknown")),
      h("td", { class: "mono wrap" }, r.changes),
      h("td", {}, r.revision === image.revision ? null : h("button", { class: "secondary rollback", onclick: async () => {
        if (!confirm(`Roll ${name} back to revision ${r.revision}? This saves revision ${image.revision + 1} with its content, and every machine not pinned boots it from its next script.`)) return;
        try {
          const saved = await api("POST", path + "/rollback", { revision: r.revision });
          await reopen(`${name}: revision ${saved.revision} restores revision ${r.revision}`);
        } catch (err) { flash(err.message, true); }
      } }, "Roll back to this"))))));
  box.replaceChildren(h("h2", {}, `Edit ${name}`), form, h("h3", {}, "Revisions"), history);
}

// The binaries `bootfleet ipxe build` left in the boot directory's ipxe/:
// NIC ROMs to flash (method 2) and loaders PXE firmware chainloads (method 4).
function ipxeBuilds(ipxe) {
  if (!ipxe.files.length) {
    return h("p", { class: "muted" }, "None yet: `bootfleet ipxe build --source IPXE_TREE --config CONFIG` builds undionly.kpxe, snponly.efi, ipxe.efi and NIC ROMs that fetch each machine's script from this server.");
  }
  return h("div", {},
    h("table", { id: "ipxe-builds" },
      h("thead", {}, h("tr", {}, ["File", "Served as", "Size", "SHA-256"].map((t) => h("th", {}, t)))),
      h("tbody", {}, ipxe.files.map((f) => h("tr", {},
        h("td", {}, h("a", { href: "/api/v1/ipxe/" + encodeURIComponent(f.name), download: f.name }, f.name)),
        h("td", { class: "mono" }, f.boot_path), h("td", {}, size(f.size)),
        h("td", { class: "mono wrap" }, f.sha256))))),
    ipxe.script ? h("details", {}, h("summary", {}, "Embedded script"), h("pre", { class: "mono" }, ipxe.script)) : null);
}

// ---- pools ----

async function poolsPage() {
  const pools = await api("GET", "/pools");
  const rows = pools.map((p) => {
    const select = imageSelect("pool-image-" + p.name, true);
    select.dataset.pool = p.name;
    select.value = p.image || "";
    return h("tr", { dataset: { pool: p.name } },
      h("td", {}, p.name), h("td", { class: "mono" }, p.selector.join(", ") || "—"),
      h("td", {}, String(p.machines.length)), h("td", {}, p.image || "—"),
      h("td", {}, select, " ", h("button", { dataset: { poolAssign: p.name }, onclick: async () => {
        try {
          const r = await api("POST", "/pools/" + encodeURIComponent(p.name) + "/assign", { image: select.value || null });
          flash(`${r.changed} machine(s) of ${p.name} now boot ${select.value || "nothing"}`); route();
        } catch (err) { flash(err.message, true); }
      } }, "Assign to pool"), " ",
      h("button", { class: "secondary", dataset: { poolPower: p.name },
        onclick: () => startPower({ pool: p.name }, "on", "pool-waves") }, "Power on")));
  });
  const create = h("form", { class: "toolbar", id: "create-pool", onsubmit: async (e) => {
    e.preventDefault();
    const name = document.getElementById("pool-name").value.trim();
    const selector = document.getElementById("pool-selector").value.split(/[\s,]+/).filter(Boolean);
    try { await api("PUT", "/pools/" + encodeURIComponent(name), { selector }); flash("pool " + name + " saved"); route(); }
    catch (err) { flash(err.message, true); }
  } },
    h("input", { id: "pool-name", placeholder: "name", required: true }),
    h("input", { id: "pool-selector", placeholder: "labels, e.g. rack=r1 role=compute" }),
    h("button", { type: "submit" }, "Create pool"));
  return h("div", {}, h("h1", {}, "Pools"),
    h("div", { class: "toolbar" }, "Power on pools in", wavesSelect("pool-waves")),
    h("table", { id: "pools" },
      h("thead", {}, h("tr", {}, ["Pool", "Label selector", "Machines", "Image", "Assign"].map((t) => h("th", {}, t)))),
      h("tbody", {}, rows)),
    h("h2", {}, "New pool"), create);
}

// ---- power ----

function wavesSelect(id) {
  return h("select", { id, title: "how the machines are powered on" },
    h("option", { value: "adaptive" }, "adaptive waves"),
    h("option", { value: "all" }, "all at once"),
    h("option", { value: "50/10" }, "50 every 10 s"));
}

function pacing(value) {
  if (value === "all") return { mode: "all-at-once" };
  if (value === "adaptive") return { mode: "adaptive" };
  const [size, seconds] = value.split("/").map(Number);
  return { mode: "fixed", size, interval_ms: seconds * 1000 };
}

async function startPower(target, action, wavesId) {
  if (target.macs && !target.macs.length) return flash("select machines first", true);
  try {
    const job = await api("POST", "/power", { ...target, action, boot: "pxe",
      pacing: pacing(document.getElementById(wavesId).value) });
    flash(`power job ${job.id}: ${action} ${job.machines.length} machine(s)`);
    location.hash = "#/power/" + job.id;
  } catch (err) { flash(err.message, true); }
}

const STAGES = ["waiting", "sending", "powered", "starting", "loading", "up", "done", "failed", "skipped"];

async function powerJobsPage() {
  const jobs = await api("GET", "/power/jobs");
  return h("div", {}, h("h1", {}, "Power jobs"),
    jobs.length ? null : h("p", { class: "muted" }, "No power job yet: select machines (or a pool) and power them on."),
    h("table", { id: "power-jobs" },
      h("thead", {}, h("tr", {}, ["Job", "Action", "By", "Started", "Status", "Waves", "Machines per stage"].map((t) => h("th", {}, t)))),
      h("tbody", {}, jobs.map((j) => h("tr", {},
        h("td", {}, h("a", { href: "#/power/" + j.id }, String(j.id))), h("td", {}, j.spec.action),
        h("td", {}, j.actor), h("td", {}, when(j.created_ms)), h("td", {}, badge(j.status)),
        h("td", {}, String(j.waves_sent)), h("td", {}, stageSummary(j.stages)))))));
}

function stageSummary(stages) {
  return STAGES.filter((s) => stages[s]).map((s) => `${s} ${stages[s]}`).join(", ");
}

async function powerJobPage(id) {
  const body = h("div", { id: "power-job" });
  const render = (job) => {
    const control = (verb) => h("button", { id: "job-" + verb, class: "secondary", onclick: async () => {
      try { await api("POST", `/power/jobs/${job.id}/${verb}`); flash(`job ${job.id}: ${verb}`); }
      catch (err) { flash(err.message, true); }
    } }, verb[0].toUpperCase() + verb.slice(1));
    const running = job.status === "running" || job.status === "paused";
    body.replaceChildren(h("div", {},
      h("h1", {}, `Power job ${job.id}: ${job.spec.action}`),
      h("p", {}, badge(job.status, "job-status"), ` waves sent ${job.waves_sent}, `,
        h("span", { id: "job-stages" }, stageSummary(job.stages)),
        job.estimated_seconds_left != null ? `, about ${job.estimated_seconds_left} s left` : ""),
      running ? h("div", { class: "toolbar" },
        job.status === "paused" ? control("resume") : control("pause"), control("cancel")) : null,
      h("table", { id: "power-machines" },
        h("thead", {}, h("tr", {}, ["MAC", "Wave", "Stage", "Last phase", "Detail"].map((t) => h("th", {}, t)))),
        h("tbody", {}, job.machines.map((m) => h("tr", { dataset: { mac: m.mac, stage: m.stage } },
          h("td", { class: "mono" }, h("a", { href: "#/machine/" + encodeURIComponent(m.mac) }, m.mac)),
          h("td", {}, m.wave == null ? "" : String(m.wave + 1)), h("td", {}, badge(m.stage)),
          h("td", {}, m.phase || ""), h("td", {}, m.detail)))))));
    return job.finished_ms != null;
  };
  const first = await api("GET", "/power/jobs/" + encodeURIComponent(id));
  if (!render(first)) {
    // Followed once a second while the page shows it (closed on leaving).
    const timer = setInterval(async () => {
      try { if (render(await api("GET", "/power/jobs/" + encodeURIComponent(id)))) clearInterval(timer); }
      catch (err) { clearInterval(timer); flash(err.message, true); }
    }, 1000);
    state.streams.push({ close: () => clearInterval(timer) });
  }
  return body;
}

// ---- API tokens ----

async function tokensPage() {
  const tokens = await api("GET", "/tokens");
  const secret = h("p", { id: "token-secret", class: "mono", hidden: true });
  const create = h("form", { class: "toolbar", id: "token-form", onsubmit: async (e) => {
    e.preventDefault();
    try {
      const t = await api("POST", "/tokens", {
        name: document.getElementById("token-name").value.trim(),
        scope: document.getElementById("token-scope").value,
      });
      // Shown once: the server keeps only its hash.
      secret.textContent = t.token;
      secret.hidden = false;
      flash(`token ${t.name} created; copy it now, it is not shown again`);
      const rows = document.querySelector("#tokens tbody");
      rows.append(tokenRow({ ...t, user: state.user, created_ms: Date.now(), last_used_ms: null }));
    } catch (err) { flash(err.message, true); }
  } },
    h("input", { id: "token-name", placeholder: "name, e.g. ci", required: true }),
    h("select", { id: "token-scope" }, ["read", "assign", "admin"].map((s) => h("option", { value: s }, s))),
    h("button", { type: "submit" }, "Create token"));
  return h("div", {}, h("h1", {}, "API tokens"),
    h("p", { class: "muted" }, "Scripts and the command line authenticate with Authorization: Bearer <token>."),
    h("table", { id: "tokens" },
      h("thead", {}, h("tr", {}, ["Name", "For", "Scope", "Created", "Last used", ""].map((t) => h("th", {}, t)))),
      h("tbody", {}, tokens.map(tokenRow))),
    h("h2", {}, "New token"), create, secret);
}

function tokenRow(t) {
  return h("tr", { dataset: { token: t.name } },
    h("td", {}, t.name), h("td", {}, t.user), h("td", {}, t.scope),
    h("td", {}, when(t.created_ms)), h("td", {}, when(t.last_used_ms)),
    h("td", {}, h("button", { class: "secondary", onclick: async () => {
      if (!confirm(`Revoke token ${t.name}? Whatever uses it is refused from now on.`)) return;
      try { await api("DELETE", "/tokens/" + t.id); flash("revoked " + t.name); route(); }
      catch (err) { flash(err.message, true); }
    } }, "Revoke")));
}

// ---- audit ----

async function auditPage() {
  const entries = await api("GET", "/audit?limit=500");
  return h("div", {}, h("h1", {}, "Audit log"),
    h("table", { id: "audit" },
      h("thead", {}, h("tr", {}, ["When", "Who", "What", "Target", "Detail"].map((t) => h("th", {}, t)))),
      h("tbody", {}, entries.map((a) => h("tr", {},
        h("td", {}, new Date(a.at_ms).toLocaleString()), h("td", {}, a.actor), h("td", {}, a.action),
        h("td", { class: "mono" }, a.target), h("td", {}, a.detail))))));
}

document.addEventListener("DOMContentLoaded", start);
