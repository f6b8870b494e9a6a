// bonemets review: the study page. Plain JavaScript, no build step. Everything it shows comes
// from the JSON API (GET /api/studies/<uid>); every decision goes back through it.
"use strict";
(function () {
  const root = document.getElementById("study");
  if (!root) return;
  const uid = root.dataset.studyUid;
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const api = "/api/studies/" + encodeURIComponent(uid);
  const cards = document.getElementById("cards");
  const template = document.getElementById("card-template");
  const status = document.getElementById("status");
  const signButton = document.querySelector('button[data-action="sign"]');
  const stateLine = document.getElementById("study-state");
  const slice = document.getElementById("slice");
  const range = document.getElementById("slice-range");
  const sliceLabel = document.getElementById("slice-label");
  let study = null;
  let current = null;

  function say(text) { status.textContent = text || ""; }

  async function call(method, url, body) {
    const options = { method: method, headers: { "Accept": "application/json" }, credentials: "same-origin" };
    if (body !== undefined) {
      options.headers["Content-Type"] = "application/json";
      options.headers["X-CSRF-Token"] = csrf;
      options.body = JSON.stringify(body);
    } else if (method !== "GET") {
      options.headers["X-CSRF-Token"] = csrf;
    }
    const response = await fetch(url, options);
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (response.status === 401) { window.location = "/login?next=" + encodeURIComponent(location.pathname); }
    if (!response.ok) { throw new Error((data && data.error) || ("HTTP " + response.status)); }
    return data;
  }

  function fmt(value, digits) {
    if (value === null || value === undefined) return "-";
    return Number(value).toFixed(digits);
  }

  function fact(dl, name, value) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = value;
    dl.append(dt, dd);
  }

  function describe(lesion) {
    if (!lesion.decision) return "to decide";
    const who = " by " + lesion.reader + " at " + lesion.time;
    if (lesion.decision === "reject") return "rejected (" + lesion.reason + ")" + who + (lesion.note ? ": " + lesion.note : "");
    return (lesion.added ? "added" : "accepted") + who + (lesion.note ? ": " + lesion.note : "");
  }

  function build(lesion) {
    const card = template.content.firstElementChild.cloneNode(true);
    card.dataset.lesionId = String(lesion.id);
    card.dataset.added = lesion.added ? "true" : "false";
    card.querySelector(".title").textContent = "Lesion " + lesion.id;
    card.querySelectorAll("img[data-view]").forEach(function (img) {
      img.src = api + "/lesions/" + lesion.id + "/" + img.dataset.view + ".png";
      img.alt = "lesion " + lesion.id + ", " + img.dataset.view;
    });
    const dl = card.querySelector("dl.facts");
    fact(dl, "bone", lesion.bone || "-");
    fact(dl, "volume", fmt(lesion.volume_ml, 3) + " ml");
    fact(dl, "mean HU", fmt(lesion.hu_mean, 0));
    fact(dl, "max HU", fmt(lesion.hu_max, 0));
    fact(dl, "score", lesion.score === null || lesion.score === undefined ? "-" : fmt(lesion.score, 2));
    card.addEventListener("focus", function () { setCurrent(card, false); });
    card.addEventListener("click", function (event) {
      if (!event.target.closest("button, select, input")) setCurrent(card, true);
    });
    card.querySelector('[data-action="accept"]').addEventListener("click", function () { decide(card, "accept"); });
    card.querySelector('[data-action="reject"]').addEventListener("click", function () { decide(card, "reject"); });
    card.querySelector('select[name="reason"]').addEventListener("change", function (event) {
      event.target.classList.remove("wanted");
      if (card.dataset.pending === "reject" || card.dataset.decision === "reject") decide(card, "reject");
    });
    card.querySelector('input[name="note"]').addEventListener("change", function () {
      if (card.dataset.decision) decide(card, card.dataset.decision);
    });
    return card;
  }

  function show(card, lesion) {
    card.dataset.decision = lesion.decision || "";
    card.querySelector('[data-action="accept"]').classList.toggle("chosen", lesion.decision === "accept");
    card.querySelector('[data-action="reject"]').classList.toggle("chosen", lesion.decision === "reject");
    const reason = card.querySelector('select[name="reason"]');
    const note = card.querySelector('input[name="note"]');
    if (lesion.decision === "reject" && document.activeElement !== reason) reason.value = lesion.reason;
    if (lesion.decision && document.activeElement !== note && !note.value) note.value = lesion.note || "";
    card.querySelector(".decision").textContent = describe(lesion);
  }

  function cardOf(id) { return cards.querySelector('.card[data-lesion-id="' + id + '"]'); }

  function render(data) {
    study = data;
    data.lesions.forEach(function (lesion) {
      let card = cardOf(lesion.id);
      if (!card) { card = build(lesion); cards.append(card); }
      show(card, lesion);
    });
    const signed = !!data.signed;
    stateLine.textContent = data.state;
    const undecided = data.lesions.filter(function (l) { return !l.decision; }).length;
    signButton.disabled = signed || undecided > 0;
    signButton.title = signed ? data.state : (undecided ? undecided + " lesion(s) without a decision" : "sign the study");
    cards.querySelectorAll("button, select, input").forEach(function (el) { el.disabled = signed; });
    if (!current && cards.firstElementChild) setCurrent(cards.firstElementChild, false);
  }

  function setCurrent(card, focus) {
    if (current) current.classList.remove("current");
    current = card;
    card.classList.add("current");
    if (focus) card.focus();
  }

  async function decide(card, decision) {
    const reason = card.querySelector('select[name="reason"]');
    const note = card.querySelector('input[name="note"]').value;
    setCurrent(card, false);
    if (decision === "reject" && !reason.value) {
      card.dataset.pending = "reject";
      reason.classList.add("wanted");
      reason.focus();
      say("Choose a reason for rejecting lesion " + card.dataset.lesionId + ".");
      return;
    }
    delete card.dataset.pending;
    const body = { decision: decision, note: note };
    if (decision === "reject") body.reason = reason.value;
    try {
      const lesion = await call("POST", api + "/lesions/" + card.dataset.lesionId, body);
      show(card, lesion);
      say("Lesion " + lesion.id + ": " + describe(lesion) + ".");
      await refresh();
    } catch (e) { say(e.message); await refresh(); }
  }

  async function sign() {
    signButton.disabled = true;
    try {
      const result = await call("POST", api + "/sign");
      say("Signed. The final SEG and report go to the PACS.");
      stateLine.textContent = result.state;
    } catch (e) { say(e.message); }
    await refresh();
  }

  // --- the slice viewer -----------------------------------------------------------------
  function added() { return study ? study.lesions.filter(function (l) { return l.added; }).length : 0; }

  function showSlice(k) {
    const n = study.slices.count;
    k = Math.max(0, Math.min(n - 1, k));
    range.value = String(k);
    slice.dataset.slice = String(k);
    slice.src = api + "/slices/" + k + ".png?v=" + added();
    sliceLabel.textContent = (k + 1) + " / " + n;
  }

  function pointAt(event) {
    const box = slice.getBoundingClientRect();
    const u = (event.clientX - box.left) * slice.naturalWidth / box.width;
    const v = (event.clientY - box.top) * slice.naturalHeight / box.height;
    const k = Number(slice.dataset.slice);
    return study.slices.affine.map(function (row) { return row[0] * u + row[1] * v + row[2] * k + row[3]; });
  }

  slice.addEventListener("click", async function (event) {
    if (!study || study.signed) return;
    const point = pointAt(event);
    try {
      const lesion = await call("POST", api + "/lesions", { point_mm: point });
      say("Lesion " + lesion.id + " added (" + fmt(lesion.volume_ml, 3) + " ml).");
      await refresh();
      showSlice(Number(slice.dataset.slice));
      const card = cardOf(lesion.id);
      if (card) { setCurrent(card, true); card.scrollIntoView({ block: "nearest" }); }
    } catch (e) { say(e.message); }
  });
  slice.addEventListener("wheel", function (event) {
    event.preventDefault();
    showSlice(Number(slice.dataset.slice) + (event.deltaY > 0 ? -1 : 1));
  }, { passive: false });
  range.addEventListener("input", function () { showSlice(Number(range.value)); });

  // --- keyboard ---------------------------------------------------------------------------
  document.addEventListener("keydown", function (event) {
    if (event.target.closest("input, select, textarea") || event.ctrlKey || event.metaKey || event.altKey) return;
    const all = Array.from(cards.querySelectorAll(".card"));
    if (!all.length) return;
    const at = Math.max(0, all.indexOf(current));
    if (event.key === "a") { event.preventDefault(); decide(all[at], "accept"); }
    else if (event.key === "r") { event.preventDefault(); decide(all[at], "reject"); }
    else if (event.key === "ArrowDown" || event.key === "ArrowRight") { event.preventDefault(); setCurrent(all[Math.min(all.length - 1, at + 1)], true); }
    else if (event.key === "ArrowUp" || event.key === "ArrowLeft") { event.preventDefault(); setCurrent(all[Math.max(0, at - 1)], true); }
  });

  signButton.addEventListener("click", sign);

  async function refresh() {
    try { render(await call("GET", api)); } catch (e) { say(e.message); }
  }

  (async function start() {
    await refresh();
    if (!study) return;
    range.max = String(study.slices.count - 1);
    slice.dataset.ready = "true";
    showSlice(study.slices.start);
    root.dataset.ready = "true";
    setInterval(refresh, 10000);  // a second reader's decisions appear
  })();
})();
