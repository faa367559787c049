// One call: while it is open, its state as it moves (initiating, ringing, active, ended), the live
// transcript from its event stream (speakers labelled, partials replaced by finals, translations under
// their lines, redaction markers shown as such), the caller's audio and the agent's microphone over
// WebRTC, and Hang up; once it has ended, its summary, recordings (played through a signed URL) and the
// stored transcript, live and from the recording.
//
// The event stream reconnects by itself (EventSource sends Last-Event-ID); while it is down the page
// says so.  A final state without a media stream (busy, no answer) ends the live view after a short
// wait for call.ended.  Leaving the page closes the stream and ends the WebRTC session.

import { api, explain, newKey } from "./api.js";
import { h, message, when, duration, redactedText, announce } from "./dom.js";

const OPEN = new Set(["initiating", "ringing", "active", "ending"]);
const STATE_TEXT = {
  initiating: "Placing the call…", ringing: "Ringing…", active: "Connected: the call is live.",
  ending: "Hanging up…", completed: "The call has ended.", no_answer: "No answer: the call has ended.",
  busy: "The line was busy: the call has ended.", failed: "The call failed.",
};
const SPEAKERS = { inbound: "Debtor", outbound: "Agent line", agent: "Agent" };
const ICE_WAIT_MS = 5000;
const FINAL_GRACE_MS = 3000;

function stateText(status) {
  return STATE_TEXT[status] || `State: ${status}`;
}

export async function call(ctx) {
  const callId = decodeURIComponent(ctx.match[1]);
  let detail;
  try {
    detail = await api("GET", `/api/calls/${encodeURIComponent(callId)}`);
  } catch (err) {
    if (err.status === 404) {
      ctx.title("Call not found");
      ctx.root.append(message("There is no such call in your organisation.", "error"),
        h("p", {}, h("a", { href: "#/calls", text: "All calls" })));
      return null;
    }
    throw err;
  }
  if (!ctx.current()) return null;
  ctx.title(`Call to ${detail.to_number ? `…${detail.to_number.slice(-4)}` : callId}`);
  const back = detail.account_id ? h("a", { href: `#/accounts/${detail.account_id}`, text: "← The account" })
    : h("a", { href: "#/calls", text: "← All calls" });
  const state = h("p", { class: "state", id: "call-state", role: "status", dataset: { state: detail.status } },
    stateText(detail.status));
  const summary = h("section", { id: "summary" }); // named by its heading once it has one
  ctx.root.append(h("p", {}, back), state);
  const live = OPEN.has(detail.status) ? liveView(ctx, callId, detail, state, summary) : null;
  ctx.root.append(summary);
  if (!live) await renderSummary(ctx, callId, summary, detail);
  return live ? live.close : null;
}

// ---- the live call ----------------------------------------------------------------------------------

function liveView(ctx, callId, detail, state, summary) {
  const section = h("section", { id: "live", "aria-labelledby": "live-title" }, h("h2", { id: "live-title", text: "Live" }));
  const connection = h("p", { class: "hint", id: "stream-status", role: "status" });
  const toolbar = h("div", { class: "toolbar" });
  const audio = h("audio", { id: "caller-audio", controls: true, "aria-label": "Caller audio" });
  const audioStatus = h("p", { class: "hint", id: "audio-status", role: "status" }, "Audio: not joined.");
  const list = h("ol", { class: "transcript", id: "transcript", "aria-live": "polite", "aria-relevant": "additions",
    "aria-label": "Live transcript" });
  const problems = h("div");
  section.append(toolbar, audioStatus, audio, connection, problems, h("h3", { text: "Transcript" }), list);
  ctx.root.append(section);

  const lines = new Map();
  let ended = false;
  let source = null;
  let rtc = null;
  let graceTimer = null;

  function setState(status) {
    state.dataset.state = OPEN.has(status) ? status : "ended";
    state.textContent = stateText(status);
    if (status === "ending" || !OPEN.has(status)) hangup.disabled = true;
  }

  // --- transcript
  function lineElement(entry) {
    const li = h("li", { dataset: { track: entry.track, seq: String(entry.seq), final: String(entry.final) },
      "aria-hidden": entry.final ? null : "true" },
      h("span", { class: "speaker", text: `${SPEAKERS[entry.track] || entry.track}:` }), " ",
      h("span", { class: "text", lang: entry.language || null }, redactedText(entry.text)),
      entry.final ? null : [" ", h("span", { class: "speaking", text: "(speaking…)" })]);
    if (entry.translation) li.append(translationElement(entry.translation));
    return li;
  }

  function translationElement(t) {
    return t.error ? h("p", { class: "translation" }, h("span", { class: "label", text: "Translation unavailable:" }), ` ${t.error}`)
      : h("p", { class: "translation" }, h("span", { class: "label", text: `Translation (${t.lang}):` }), " ",
        h("span", { class: "translated", lang: t.lang }, redactedText(t.text)));
  }

  function upsert(p, final) {
    const key = `${p.stream_id || ""}|${p.track}|${p.seq}`;
    const known = lines.get(key);
    if (known && known.entry.final && !final) return;
    if (final && !(p.text || "").trim()) { // the recogniser heard nothing after all: no line
      if (known) known.li.remove();
      lines.delete(key);
      return;
    }
    const entry = known ? known.entry : { track: p.track, seq: p.seq, text: "", final: false, translation: null };
    entry.text = p.text || "";
    entry.language = p.language || entry.language || null; // what the track was recognised in
    entry.final = final;
    const li = lineElement(entry);
    if (known) known.li.replaceWith(li);
    else list.append(li);
    lines.set(key, { entry, li });
  }

  function translate(p, t) {
    const key = `${p.stream_id || ""}|${p.track}|${p.seq}`;
    if (!lines.has(key)) upsert({ ...p, text: p.original || "", language: p.source_lang }, true);
    const known = lines.get(key);
    known.entry.translation = t;
    const li = lineElement(known.entry);
    known.li.replaceWith(li);
    known.li = li;
  }

  function notice(text) {
    list.append(h("li", { class: "notice", text }));
  }

  function finish() {
    if (ended) return;
    ended = true;
    clearTimeout(graceTimer);
    if (source) source.close();
    source = null;
    leaveAudio();
    toolbar.replaceChildren();
    connection.textContent = "";
    announce("The call has ended.");
    setTimeout(() => {
      if (ctx.current()) renderSummary(ctx, callId, summary).catch((err) => summary.append(message(explain(err), "error")));
    }, 500);
  }

  const handlers = {
    "call.state": (p) => {
      setState(p.state);
      if (!OPEN.has(p.state)) graceTimer = setTimeout(finish, FINAL_GRACE_MS); // no media: no call.ended
    },
    "call.started": () => {
      if (state.dataset.state === "initiating" || state.dataset.state === "ringing") setState("active");
      notice("Audio is streaming.");
    },
    "transcript.partial": (p) => upsert(p, false),
    "transcript.final": (p) => upsert(p, true),
    "translation.final": (p) => translate(p, { text: p.translated, lang: p.target_lang, error: null }),
    "translation.failed": (p) => translate(p, { text: "", lang: p.target_lang, error: p.reason || "failed" }),
    "agent.joined": () => notice("An agent joined the audio."),
    "agent.left": (p) => {
      notice(`An agent left the audio${p.reason ? ` (${p.reason})` : ""}.`);
      if (rtc && rtc.sessionId && p.session_id === rtc.sessionId) leaveAudio(false, "The server ended your audio session.");
    },
    "stt.failover": (p) => notice(`Speech recognition switched from ${p.from} to ${p.to}.`),
    "stt.failed": () => notice("Speech recognition failed for part of the call."),
    "stream.gap": () => notice("Some live events were missed; the stored transcript will have them."),
    "call.ended": (p) => {
      notice(p.reason ? `Call ended (${p.reason}).` : "Call ended.");
      setState(state.dataset.state === "ended" ? detail.status : "completed");
      finish();
    },
  };

  function open() {
    source = new EventSource(`/api/calls/${encodeURIComponent(callId)}/events`);
    for (const [name, handle] of Object.entries(handlers)) {
      source.addEventListener(name, (ev) => {
        try {
          handle(JSON.parse(ev.data));
        } catch (err) {
          window.workspace.errors.push(`${name}: ${err}`);
        }
      });
    }
    source.addEventListener("open", () => { connection.textContent = ""; });
    source.addEventListener("error", async () => {
      if (ended || !source) return;
      if (source.readyState === EventSource.CONNECTING) {
        connection.textContent = "The live connection dropped; reconnecting…";
        return;
      }
      // Closed for good: the session ended (the shell takes over) or the call is gone.
      try {
        await api("GET", "/api/auth/me");
        connection.textContent = "The live connection closed. Reload the page to try again.";
      } catch {
        // api() has told the shell
      }
    });
  }

  // --- audio over WebRTC
  const join = h("button", { type: "button", id: "join-audio", text: "Join audio" });
  const leave = h("button", { type: "button", id: "leave-audio", class: "secondary", text: "Leave audio", hidden: true });
  const takeover = h("button", { type: "button", id: "take-over", class: "secondary", text: "Take over my other session",
    hidden: true });
  const hangup = h("button", { type: "button", id: "hang-up", class: "danger", text: "Hang up" });
  if (ctx.can("calls.join")) toolbar.append(join, leave, takeover);
  else audioStatus.textContent = "Your role listens through the transcript only.";
  if (ctx.can("calls.place")) toolbar.append(hangup);
  const hangupKey = newKey();

  hangup.addEventListener("click", async () => {
    hangup.disabled = true;
    try {
      const out = await api("POST", "/api/voice/hangup", { call_id: callId }, { idempotencyKey: hangupKey });
      setState(out.status);
      announce("Hanging up.");
    } catch (err) {
      problems.replaceChildren(message(`Hang up failed: ${explain(err)}`, "error"));
      hangup.disabled = false;
    }
  });

  async function joinAudio(replace = false) {
    if (rtc) return;
    join.disabled = true;
    takeover.hidden = true;
    problems.replaceChildren();
    audioStatus.textContent = "Audio: asking for the microphone…";
    rtc = { pc: null, mic: null, sessionId: null };
    try {
      const mic = await navigator.mediaDevices.getUserMedia({ audio: true, video: false });
      if (!rtc) {
        mic.getTracks().forEach((t) => t.stop());
        return;
      }
      rtc.mic = mic;
      const pc = new RTCPeerConnection({ iceServers: [] });
      rtc.pc = pc;
      mic.getAudioTracks().forEach((t) => pc.addTrack(t, mic));
      pc.addEventListener("track", (ev) => {
        audio.srcObject = ev.streams[0] || new MediaStream([ev.track]);
        audio.play().catch(() => { audioStatus.textContent = "Audio: press play on “Caller audio” to hear the caller."; });
      });
      pc.addEventListener("connectionstatechange", () => {
        if (!rtc || rtc.pc !== pc) return;
        if (pc.connectionState === "connected") audioStatus.textContent = "Audio: connected. The caller hears you.";
        else if (pc.connectionState === "failed" || pc.connectionState === "closed") {
          leaveAudio(false, "The audio connection was lost.");
        }
      });
      await pc.setLocalDescription(await pc.createOffer());
      await iceComplete(pc);
      audioStatus.textContent = "Audio: connecting…";
      const answer = await api("POST", "/api/webrtc/offer", { call_id: callId, sdp: pc.localDescription.sdp,
        type: "offer", language: "en", replace });
      if (!rtc || rtc.pc !== pc) {
        api("DELETE", `/api/webrtc/sessions/${encodeURIComponent(answer.session_id)}`).catch(() => {});
        return;
      }
      rtc.sessionId = answer.session_id;
      await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
      join.hidden = true;
      leave.hidden = false;
      leave.focus();
    } catch (err) {
      const conflict = err && err.status === 409;
      leaveAudio(false, `Audio not joined: ${explain(err)}`);
      if (conflict) takeover.hidden = false;
    }
  }

  function leaveAudio(tellServer = true, why = "Audio: not joined.") {
    const r = rtc;
    rtc = null;
    if (r) {
      if (r.mic) r.mic.getTracks().forEach((t) => t.stop());
      if (tellServer && r.sessionId) {
        fetch(`/api/webrtc/sessions/${encodeURIComponent(r.sessionId)}`, { method: "DELETE", credentials: "same-origin",
          keepalive: true }).catch(() => {});
      }
      if (r.pc) r.pc.close();
    }
    audio.srcObject = null;
    audioStatus.textContent = why;
    const hadFocus = document.activeElement === leave;
    join.hidden = false;
    join.disabled = false;
    leave.hidden = true;
    if (hadFocus) join.focus();
  }

  // Telnyx's first webhooks may come before this page listens (or before the server holds the call's
  // event channel): until the call is active, its state is also read from the REST API now and then.
  let polls = 0;
  const poller = setInterval(async () => {
    if (ended || !OPEN.has(state.dataset.state) || state.dataset.state === "active" || ++polls > 150) {
      clearInterval(poller);
      return;
    }
    try {
      const d = await api("GET", `/api/calls/${encodeURIComponent(callId)}`);
      if (!ended && d.status !== state.dataset.state && (OPEN.has(d.status) ? d.status === "active" || d.status === "ringing"
        : true)) {
        handlers["call.state"]({ state: d.status });
      }
    } catch {
      clearInterval(poller); // a 401 has told the shell; anything else: the event stream carries on
    }
  }, 2000);

  join.addEventListener("click", () => joinAudio(false));
  takeover.addEventListener("click", () => joinAudio(true));
  leave.addEventListener("click", () => leaveAudio(true));
  open();
  return {
    close() {
      ended = true;
      clearInterval(poller);
      clearTimeout(graceTimer);
      if (source) source.close();
      source = null;
      leaveAudio(true);
    },
  };
}

function iceComplete(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => {
      pc.removeEventListener("icegatheringstatechange", check);
      if (/^a=candidate:/m.test(pc.localDescription.sdp)) resolve();
      else reject(new Error("no network candidates were gathered"));
    }, ICE_WAIT_MS);
    function check() {
      if (pc.iceGatheringState === "complete") {
        clearTimeout(timer);
        pc.removeEventListener("icegatheringstatechange", check);
        resolve();
      }
    }
    pc.addEventListener("icegatheringstatechange", check);
  });
}

// ---- after the call ---------------------------------------------------------------------------------

async function renderSummary(ctx, callId, section, known = null) {
  const d = known || await api("GET", `/api/calls/${encodeURIComponent(callId)}`);
  if (!ctx.current()) return;
  const state = document.getElementById("call-state");
  if (state && !OPEN.has(d.status)) {
    state.dataset.state = "ended";
    state.textContent = stateText(d.status);
  }
  section.setAttribute("aria-labelledby", "summary-title");
  section.replaceChildren(h("h2", { id: "summary-title", text: "Summary" }),
    h("dl", { class: "facts" },
      h("dt", { text: "Status" }), h("dd", { id: "summary-status", text: d.status }),
      h("dt", { text: "Ended because" }), h("dd", { text: d.end_reason || "—" }),
      h("dt", { text: "Direction" }), h("dd", { text: d.direction || "—" }),
      h("dt", { text: "To" }), h("dd", { text: d.to_number ? `…${d.to_number.slice(-4)}` : "—" }),
      h("dt", { text: "Started" }), h("dd", { text: when(d.started_at) }),
      h("dt", { text: "Ended" }), h("dd", { text: when(d.ended_at) }),
      h("dt", { text: "Duration" }), h("dd", { text: duration(d.started_at, d.ended_at) }),
      h("dt", { text: "Agent" }), h("dd", { text: d.agent ? d.agent.display_name : "—" })));

  section.append(h("h3", { text: "What was said" }));
  if (d.summary) {
    const sc = d.summary.score || {};
    const promise = sc.promise_to_pay;
    const yes = (v) => (v ? "yes" : "no");
    section.append(h("p", { id: "call-summary-text" }, redactedText(d.summary.text)),
      h("dl", { class: "facts", id: "call-score" },
        h("dt", { text: "Disclosure spoken" }), h("dd", { text: yes(sc.disclosure_spoken) }),
        h("dt", { text: "Promise to pay" }), h("dd", { text: promise
          ? [promise.amount || "amount not said", promise.date || "date not said"].join(", ") : "no" }),
        h("dt", { text: "Dispute raised" }), h("dd", { text: yes(sc.dispute) }),
        h("dt", { text: "Callback requested" }), h("dd", { text: yes(sc.callback_requested) })),
      h("p", { class: "hint", text: `From the ${d.summary.source === "batch" ? "recording's" : "live"} transcript, `
        + (d.summary.engine === "llm" ? `by a model (${d.summary.model}).`
          : `by rules (no AI provider)${d.summary.fallback ? `: the model's answer was not used (${d.summary.fallback})` : ""}.`) }));
  } else {
    section.append(h("p", { id: "no-summary", text: "Not yet: the summary is written a few seconds after the call." }));
  }

  section.append(h("h3", { text: "Recordings" }));
  if (!d.recordings.length) {
    section.append(h("p", { id: "no-recordings", text: OPEN.has(d.status) ? "Not yet." :
      "None yet: a recording is stored a little after the call ends." }));
  }
  for (const r of d.recordings) {
    const player = h("div", { class: "recording" });
    const play = h("button", { type: "button", class: "secondary",
      text: `Play the ${r.source === "telnyx" ? "carrier's" : "stream"} recording (${Math.round(r.duration_ms / 1000)} s)` });
    play.addEventListener("click", async () => {
      play.disabled = true;
      try {
        const signed = await api("GET", `/api/calls/${encodeURIComponent(callId)}/recordings/${r.id}/url?expires_in=900`);
        const audio = h("audio", { controls: true, src: signed.url, preload: "metadata",
          "aria-label": `Recording from ${when(r.created_at)}` });
        player.replaceChildren(audio);
        audio.focus();
      } catch (err) {
        player.append(message(`The recording cannot be played: ${explain(err)}`, "error"));
        play.disabled = false;
      }
    });
    player.append(play);
    section.append(player);
  }

  const said = d.transcripts.filter((t) => (t.text || "").trim());
  const live = said.filter((t) => t.kind !== "batch");
  const batch = said.filter((t) => t.kind === "batch");
  section.append(h("h3", { text: "Transcript" }), transcriptList(live, "live-transcript", d.translations),
    h("h3", { text: "Transcript from the recording" }),
    batch.length ? transcriptList(batch, "batch-transcript", [])
      : h("p", { id: "no-batch", text: "Not yet: the recording is transcribed after the call." }));
  if (d.truncated) section.append(h("p", { class: "hint", text: "Long call: only the first lines are shown." }));
}

function transcriptList(items, id, translations) {
  if (!items.length) return h("p", { id, text: "Nothing was said, or nothing was kept." });
  const byLine = new Map(translations.map((t) => [t.transcription_id, t]));
  return h("ol", { class: "transcript", id }, items.map((t) => h("li", { dataset: { track: t.track, kind: t.kind } },
    h("span", { class: "speaker", text: `${SPEAKERS[t.track] || t.track}:` }), " ",
    h("span", { class: "text" }, redactedText(t.text)),
    t.kind === "partial" ? h("span", { class: "speaking", text: " (cut off: no final)" }) : null,
    byLine.has(t.id) ? h("p", { class: "translation" }, h("span", { class: "label", text: `Translation (${byLine.get(t.id).target_lang}):` }),
      " ", h("span", { lang: byLine.get(t.id).target_lang }, redactedText(byLine.get(t.id).translated_text))) : null)));
}
