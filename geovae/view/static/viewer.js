/* geovae view: the page. Talks only to the server it came from (relative URLs). */
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const el = (tag, attrs, ...children) => {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") e.className = v;
      else if (k === "text") e.textContent = v;
      else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
      else e.setAttribute(k, v);
    }
    for (const c of children) if (c != null) e.append(c);
    return e;
  };

  const DEFAULT_OPACITY = { scene: 1, classes: 0.65, confidence: 0.8, uncertainty: 0.8, reconstruction_error: 0.8 };
  const DEFAULT_ON = { scene: true, classes: true };
  // draw order, bottom to top: each layer kind gets its own pane
  const ORDER = ["scene", "classes", "confidence", "uncertainty", "reconstruction_error"];

  const map = L.map("map", { preferCanvas: true, maxZoom: 22, zoomSnap: 0.25, worldCopyJump: false });
  map.attributionControl.setPrefix('<a href="https://leafletjs.com" title="Leaflet">Leaflet</a>');
  ORDER.forEach((kind, i) => { map.createPane("geovae-" + kind).style.zIndex = String(250 + i * 10); });
  map.createPane("geovae-polygons").style.zIndex = "420";
  map.createPane("geovae-highlight").style.zIndex = "430";
  const polygonRenderer = L.canvas({ pane: "geovae-polygons", padding: 0.2 });
  const highlightRenderer = L.canvas({ pane: "geovae-highlight", padding: 0.2 });
  map.setView([0, 0], 2);

  const state = {
    catalog: null, scene: null, tiles: {}, visible: {}, opacity: {},
    polygonsOn: true, polygons: null, highlight: null, popup: null,
    loading: new Set(), polyAbort: null, polyTimer: null, footprints: null,
  };
  window.geovae = { map, state };

  // ---------------------------------------------------------------- readiness (for people and tests)
  function markBusy(key) { state.loading.add(key); document.body.dataset.ready = "0"; }
  function markDone(key) {
    state.loading.delete(key);
    if (state.loading.size === 0 && state.scene) document.body.dataset.ready = "1";
  }

  async function getJSON(url, opts) {
    const r = await fetch(url, opts);
    if (!r.ok) throw new Error(url + ": " + r.status);
    return r.json();
  }

  // ---------------------------------------------------------------- formatting
  function fmtArea(value, unit) {
    if (value == null || !isFinite(value)) return "";
    if ((unit || "m2").startsWith("m2")) {
      if (value >= 1e6) return (value / 1e6).toLocaleString(undefined, { maximumFractionDigits: 2 }) + " km²";
      return (value / 1e4).toLocaleString(undefined, { maximumFractionDigits: 2 }) + " ha";
    }
    return value.toLocaleString(undefined, { maximumFractionDigits: 1 }) + " " + unit.split(" ")[0];
  }
  function fmtValue(k, v) {
    if (v == null) return "–";
    if (k === "area_m2") return fmtArea(v, "m2") + " (" + Math.round(v).toLocaleString() + " m²)";
    if (typeof v === "number" && !Number.isInteger(v)) return v.toFixed(3);
    return String(v);
  }
  function fmtNum(v) {
    if (Math.abs(v) >= 100) return v.toFixed(0);
    if (Math.abs(v) >= 1) return v.toFixed(2);
    return v.toPrecision(2);
  }

  // ---------------------------------------------------------------- layers
  function boundsOf(b) { return L.latLngBounds([[b[1], b[0]], [b[3], b[2]]]); }

  function makeTileLayer(scene, layer) {
    const t = L.tileLayer("tiles/" + scene.id + "/" + layer.kind + "/{z}/{x}/{y}.png", {
      bounds: boundsOf(scene.bounds), maxZoom: 22, opacity: state.opacity[layer.kind],
      pane: "geovae-" + layer.kind, keepBuffer: 1, updateWhenZooming: false, className: "geovae-" + layer.kind,
    });
    const key = "tiles:" + layer.kind;
    t.on("loading", () => markBusy(key));
    t.on("load", () => markDone(key));
    return t;
  }

  function setLayerVisible(kind, on) {
    const t = state.tiles[kind];
    if (!t) return;
    state.visible[kind] = on;
    const box = document.querySelector('input[data-layer="' + kind + '"]');
    if (box) box.checked = on;
    const pending = state.scene && state.scene.layers.some((l) => l.kind === kind && l.pending);
    if (on && !pending && !map.hasLayer(t)) t.addTo(map);
    if (!on && map.hasLayer(t)) { map.removeLayer(t); markDone("tiles:" + kind); }
  }

  function setOpacity(kind, value) {
    state.opacity[kind] = value;
    if (state.tiles[kind]) state.tiles[kind].setOpacity(value);
    const slider = document.querySelector('input[data-opacity="' + kind + '"]');
    if (slider) slider.value = String(Math.round(value * 100));
  }

  function layerRow(layer) {
    const kind = layer.kind;
    const box = el("input", { type: "checkbox", "data-layer": kind });
    box.checked = !!state.visible[kind];
    box.addEventListener("change", () => setLayerVisible(kind, box.checked));
    const slider = el("input", { type: "range", min: "0", max: "100", "data-opacity": kind,
                                 "aria-label": layer.title + " opacity" });
    slider.value = String(Math.round(state.opacity[kind] * 100));
    slider.addEventListener("input", () => setOpacity(kind, Number(slider.value) / 100));
    const row = el("div", { class: "layer" }, el("label", {}, box, layer.title), slider);
    if (layer.ramp) {
      row.append(el("div", { class: "ramp", style: "background: linear-gradient(to right, " + layer.ramp.join(", ") + ")" }));
      if (layer.range) row.append(el("div", { class: "ramp-labels" },
        el("span", { text: fmtNum(layer.range[0]) }), el("span", { text: fmtNum(layer.range[1]) })));
    }
    return row;
  }

  function polygonRow(scene) {
    const box = el("input", { type: "checkbox", "data-layer": "polygons" });
    box.checked = state.polygonsOn;
    box.addEventListener("change", () => setPolygons(box.checked));
    return el("div", { class: "layer" }, el("label", {}, box, "Polygons (outlines)"),
              el("div", { id: "polygon-note", class: "note" }));
  }

  // ---------------------------------------------------------------- polygons
  function setPolygons(on) {
    state.polygonsOn = on;
    const box = document.querySelector('input[data-layer="polygons"]');
    if (box) box.checked = on;
    if (!on) {
      if (state.polyAbort) state.polyAbort.abort();
      if (state.polygons) { map.removeLayer(state.polygons); state.polygons = null; }
      markDone("polygons");
    } else refreshPolygons();
  }

  function refreshPolygons() {
    const scene = state.scene;
    if (!scene || !scene.polygons || !state.polygonsOn) return;
    clearTimeout(state.polyTimer);
    markBusy("polygons");
    state.polyTimer = setTimeout(loadPolygons, 150);
  }

  async function loadPolygons() {
    const scene = state.scene;
    if (state.polyAbort) state.polyAbort.abort();
    const ctrl = new AbortController();
    state.polyAbort = ctrl;
    const b = map.getBounds();
    const bbox = [b.getWest(), b.getSouth(), b.getEast(), b.getNorth()].map((v) => v.toFixed(6)).join(",");
    try {
      const fc = await getJSON("api/" + scene.id + "/polygons?bbox=" + bbox + "&z=" + map.getZoom(), { signal: ctrl.signal });
      if (scene !== state.scene || !state.polygonsOn) return;
      const layer = L.geoJSON(fc, {
        renderer: polygonRenderer, interactive: false,
        style: { color: "#111", weight: 0.8, opacity: 0.75, fill: false },
      });
      if (state.polygons) map.removeLayer(state.polygons);
      state.polygons = layer.addTo(map);
      const note = $("polygon-note");
      if (note) note.textContent = fc.truncated
        ? "The largest " + fc.features.length.toLocaleString() + " in view are drawn; zoom in for all."
        : fc.features.length.toLocaleString() + " in view.";
      markDone("polygons");
    } catch (err) {
      if (err.name !== "AbortError") { console.warn(err); markDone("polygons"); }
    }
  }

  // ---------------------------------------------------------------- click: the polygon under the pointer
  async function identify(latlng) {
    const scene = state.scene;
    if (!scene || !scene.polygons) return;
    markBusy("identify");
    try {
      const f = await getJSON("api/" + scene.id + "/at?lon=" + latlng.lng.toFixed(7) + "&lat=" +
                              latlng.lat.toFixed(7) + "&z=" + map.getZoom());
      if (state.highlight) { map.removeLayer(state.highlight); state.highlight = null; }
      if (!f) {
        $("info").replaceChildren("No polygon here.");
        map.closePopup();
        return;
      }
      state.highlight = L.geoJSON(f, { renderer: highlightRenderer, interactive: false,
        style: { color: "#ffd400", weight: 3, opacity: 1, fill: false } }).addTo(map);
      const p = f.properties || {};
      const rows = [["polygon", f.id], ...Object.entries(p)];
      const table = () => el("table", {}, ...rows.map(([k, v]) =>
        el("tr", {}, el("td", { text: k }), el("td", { text: fmtValue(k, v) }))));
      const title = p.class_name != null ? String(p.class_name) : "class " + p.class_id;
      $("info").replaceChildren(el("div", {}, el("strong", { class: "polygon-class", text: title })), table());
      state.popup = L.popup({ maxWidth: 320 }).setLatLng(latlng)
        .setContent(el("div", { class: "polygon-popup" }, el("strong", { text: title }), table())).openOn(map);
    } catch (err) {
      console.warn(err);
    } finally {
      markDone("identify");
    }
  }

  // ---------------------------------------------------------------- a scene
  function legend(scene) {
    const body = $("legend").querySelector("tbody");
    body.replaceChildren(...scene.classes.map((c) => el("tr", { "data-class": String(c.id) },
      el("td", {}, el("span", { class: "swatch", style: "background:" + c.color })),
      el("td", { class: "class-name", text: c.name }),
      el("td", { class: "num", text: fmtArea(c.area, scene.area_unit) }),
      el("td", { class: "num", text: c.fraction != null ? (100 * c.fraction).toFixed(1) + " %" : "" }))));
    $("legend-box").hidden = scene.classes.length === 0;
  }

  function files(scene) {
    const entries = Object.entries(scene.files || {});
    $("files").replaceChildren(...entries.map(([k, href]) =>
      el("li", {}, el("a", { href: href, target: "_blank", rel: "noopener", text: k }),
        " ", el("span", { class: "muted", text: href.split("/").pop() }))));
    if (state.catalog.manifest) $("files").append(el("li", {}, el("a", { href: state.catalog.manifest, target: "_blank", text: "manifest" })));
    $("files-box").hidden = $("files").children.length === 0;
  }

  async function selectScene(id, fit) {
    document.body.dataset.ready = "0";
    const info = await getJSON("api/" + id + "/scene");
    for (const t of Object.values(state.tiles)) map.removeLayer(t);
    if (state.polygons) { map.removeLayer(state.polygons); state.polygons = null; }
    if (state.highlight) { map.removeLayer(state.highlight); state.highlight = null; }
    map.closePopup();
    state.loading.clear();
    state.tiles = {};
    state.scene = info;
    document.querySelectorAll("#scenes li").forEach((li) => li.classList.toggle("current", li.dataset.scene === id));
    $("subtitle").textContent = info.name;
    $("info").replaceChildren("Click the map to see the polygon there.");
    const err = $("scene-error");
    err.hidden = !info.error;
    err.textContent = info.error || "";
    const hasScene = info.layers.some((l) => l.kind === "scene");
    for (const layer of info.layers) {
      if (!(layer.kind in state.opacity)) state.opacity[layer.kind] = DEFAULT_OPACITY[layer.kind] ?? 0.8;
      if (!(layer.kind in state.visible)) state.visible[layer.kind] = !!DEFAULT_ON[layer.kind];
      if (layer.kind === "classes" && !hasScene && state.opacity.classes === DEFAULT_OPACITY.classes) state.opacity.classes = 1;
      state.tiles[layer.kind] = makeTileLayer(info, layer);
    }
    const rows = info.layers.map(layerRow);
    if (info.polygons) rows.push(polygonRow(info));
    $("layers").replaceChildren(...(rows.length ? rows : [el("div", { class: "muted", text: "Nothing to draw." })]));
    legend(info);
    files(info);
    if (!info.bounds) { document.body.dataset.ready = "1"; return; }
    if (fit !== false) map.fitBounds(boundsOf(info.bounds), { animate: false });
    for (const layer of info.layers) {
      if (layer.pending) continue;
      if (state.visible[layer.kind]) state.tiles[layer.kind].addTo(map);
    }
    refreshPolygons();
    if (info.layers.some((l) => l.pending)) waitForPending(info);
    if (state.loading.size === 0) document.body.dataset.ready = "1";
  }

  // A layer the server is still preparing (the RGB scene on first use): ask again until it is
  // ready, then draw it; the page counts as busy meanwhile.
  async function waitForPending(info) {
    markBusy("pending");
    while (state.scene === info) {
      await new Promise((r) => setTimeout(r, 700));
      let again;
      try { again = await getJSON("api/" + info.id + "/scene"); } catch (err) { break; }
      if (state.scene !== info) return;
      const still = new Set(again.layers.filter((l) => l.pending).map((l) => l.kind));
      for (const layer of info.layers) {
        if (!layer.pending || still.has(layer.kind)) continue;
        layer.pending = false;
        if (!again.layers.some((l) => l.kind === layer.kind)) {  // it could not be read after all
          const row = document.querySelector('input[data-layer="' + layer.kind + '"]');
          if (row) row.closest(".layer").remove();
          delete state.tiles[layer.kind];
        } else if (state.visible[layer.kind]) state.tiles[layer.kind].addTo(map);
      }
      if (still.size === 0) break;
    }
    markDone("pending");
  }

  function sceneList(catalog) {
    const list = $("scenes");
    list.replaceChildren(...catalog.scenes.map((s) => {
      const li = el("li", { "data-scene": s.id, class: s.status === "failed" ? "failed" : "",
                            title: s.error || s.name },
        el("span", { class: "scene-name", text: s.name }), el("span", { class: "status", text: s.status }));
      li.addEventListener("click", () => { if (s.bounds || s.error) selectScene(s.id); });
      return li;
    }));
    $("scenes-box").hidden = catalog.scenes.length < 2 && catalog.kind === "segment";
    const boxes = catalog.scenes.filter((s) => s.bounds).map((s) =>
      L.rectangle(boundsOf(s.bounds), { color: "#555", weight: 1, dashArray: "4 3", fill: false, interactive: false }));
    if (boxes.length > 1) state.footprints = L.layerGroup(boxes).addTo(map);
  }

  async function init() {
    document.body.dataset.ready = "0";
    const catalog = await getJSON("api/catalog");
    state.catalog = catalog;
    document.title = catalog.title + " – geovae view";
    $("title").textContent = catalog.title;
    if (catalog.basemap) {
      L.tileLayer(catalog.basemap, { maxZoom: 22, attribution: "basemap: " + new URL(catalog.basemap.replace(/\{s\}\./, "")).host }).addTo(map);
    }
    map.attributionControl.addAttribution("geovae");
    sceneList(catalog);
    const first = catalog.scenes.find((s) => s.bounds) || catalog.scenes[0];
    if (!first) { $("scene-error").hidden = false; $("scene-error").textContent = "No scenes."; document.body.dataset.ready = "1"; return; }
    await selectScene(first.id);
  }

  map.on("moveend", refreshPolygons);
  map.on("click", (e) => identify(e.latlng));

  Object.assign(window.geovae, { selectScene, setLayerVisible, setOpacity, setPolygons, identify });
  init().catch((err) => {
    console.error(err);
    $("scene-error").hidden = false;
    $("scene-error").textContent = "Could not load the catalog: " + err.message;
    document.body.dataset.ready = "1";
  });
})();
