/*
 * Switchboard agent console.
 *
 * Start: open the call's event stream first (so nothing said from then on is missed), take the
 * microphone, create the offer, wait until ICE gathering is complete (the server does not trickle
 * candidates), POST /api/webrtc/offer, apply the answer. The caller's audio comes back on the same
 * transceiver and plays in the "Caller audio" element.
 * Stop, or leaving the page: release the microphone, DELETE /api/webrtc/sessions/{id} (Stop waits for
 * its answer), close the peer connection, close the event stream. If the server ends the session, the
 * peer connection closes or fails and the page cleans up the same way, without the DELETE.
 *
 * Session states; a move not in the table is a bug and is reported on the console:
 *
 *   idle, stopped, failed  -> starting
 *   starting               -> gathering | failed | stopping
 *   gathering              -> offering | failed | stopping
 *   offering               -> connecting | failed | stopping
 *   connecting             -> connected | failed | stopping
 *   connected              -> connecting (ICE lost, may recover) | failed | stopping
 *   stopping               -> stopped
 *
 * Transcript: one line per (stream, track, seq). A partial is replaced by the next partial or the final
 * of the same utterance; a translation is shown under the line it translates. Partial lines are hidden
 * from assistive technology (they change several times a second); the final replaces the partial's
 * element with a new one, which the transcript's live region announces.
 *
 * Test hook: window.switchboard = {state, sessionId, iceState, peerState, error, transcripts, notices}.
 */
"use strict";

(() => {
  const MOVES = {
    idle: ["starting"],
    stopped: ["starting"],
    failed: ["starting"],
    starting: ["gathering", "failed", "stopping"],
    gathering: ["offering", "failed", "stopping"],
    offering: ["connecting", "failed", "stopping"],
    connecting: ["connected", "failed", "stopping"],
    connected: ["connecting", "failed", "stopping"],
    stopping: ["stopped"],
  };
  const SPEAKERS = { inbound: "Caller", agent: "Agent", outbound: "To caller" };
  const CALL_ID = /^[A-Za-z0-9:_\-.]{1,256}$/;
  const ICE_GATHERING_TIMEOUT_MS = 5000;

  const $ = (id) => document.getElementById(id);
  const form = $("session-form");
  const fields = { callId: $("call-id"), agentId: $("agent-id"), token: $("token"), language: $("language") };
  const startButton = $("start");
  const stopButton = $("stop");
  const takeoverButton = $("takeover");
  const statusLine = $("status");
  const audio = $("caller-audio");
  const list = $("transcript");

  const hook = {
    state: "idle", sessionId: null, iceState: "new", peerState: "new", error: null,
    transcripts: [], notices: [],
  };
  window.switchboard = hook;

  // The live session: everything Stop must undo.
  let session = null; // {attempt, pc, mic, callId, sessionId, token}
  let events = null; // EventSource
  let attempts = 0;
  const lines = new Map(); // key -> {entry, li}

  // ---- status ---------------------------------------------------------------------------------

  function move(next, error = null) {
    if (!MOVES[hook.state] || !MOVES[hook.state].includes(next)) {
      console.warn(`console: unexpected move ${hook.state} -> ${next}`);
    }
    hook.state = next;
    hook.error = error;
    render();
  }

  function render() {
    const peer = `ICE: ${hook.iceState}, peer: ${hook.peerState}`;
    const text = {
      idle: "Not connected.",
      starting: "Starting: asking for the microphone…",
      gathering: "Starting: gathering network candidates…",
      offering: "Starting: sending the offer to the server…",
      connecting: `Connecting (${peer})…`,
      connected: `Connected (${peer}). The server is listening to your microphone.`,
      stopping: "Stopping…",
      stopped: "Stopped.",
      failed: `Error: ${hook.error}`,
    }[hook.state];
    statusLine.textContent = text;
    statusLine.dataset.state = hook.state;
    const active = !["idle", "stopped", "failed"].includes(hook.state);
    const stoppable = active && hook.state !== "stopping";
    const hadFocus = document.activeElement;
    startButton.disabled = active;
    stopButton.disabled = !stoppable;
    for (const input of Object.values(fields)) input.disabled = active;
    // Keep keyboard focus on a usable control when the one that had it becomes disabled.
    if (hadFocus === startButton && active) stopButton.focus();
    if (hadFocus === stopButton && !stoppable) startButton.focus();
  }

  // ---- transcript -----------------------------------------------------------------------------

  function speakerOf(track) {
    return SPEAKERS[track] || track || "Unknown";
  }

  function keyOf(p) {
    return `${p.stream_id || ""}|${p.track}|${p.seq}`;
  }

  function lineElement(entry) {
    const li = document.createElement("li");
    li.dataset.track = entry.track;
    li.dataset.seq = String(entry.seq);
    li.dataset.final = String(entry.final);
    if (!entry.final) li.setAttribute("aria-hidden", "true");
    const speaker = document.createElement("span");
    speaker.className = "speaker";
    speaker.textContent = `${speakerOf(entry.track)}:`;
    const text = document.createElement("span");
    text.className = "text";
    text.textContent = entry.text;
    li.append(speaker, " ", text);
    if (!entry.final) {
      const speaking = document.createElement("span");
      speaking.className = "speaking";
      speaking.textContent = "(speaking…)";
      li.append(" ", speaking);
    }
    if (entry.translation) li.append(translationElement(entry));
    return li;
  }

  function translationElement(entry) {
    const p = document.createElement("p");
    p.className = "translation";
    const label = document.createElement("span");
    label.className = "label";
    const t = entry.translation;
    if (t.error) {
      label.textContent = "Translation unavailable:";
      p.append(label, " ", t.error);
    } else {
      label.textContent = `Translation (${t.lang}):`;
      const text = document.createElement("span");
      text.className = "translated";
      text.lang = t.lang;
      text.textContent = t.text;
      p.append(label, " ", text);
    }
    return p;
  }

  function upsertLine(payload, final) {
    const key = keyOf(payload);
    const known = lines.get(key);
    if (known && known.entry.final && !final) return; // a stale partial after its final
    const entry = known ? known.entry : {
      stream_id: payload.stream_id || null, track: payload.track, seq: payload.seq,
      text: "", final: false, translation: null,
    };
    entry.text = payload.text || "";
    entry.final = final;
    const li = lineElement(entry);
    if (known) {
      known.li.replaceWith(li);
    } else {
      hook.transcripts.push(entry);
      list.append(li);
    }
    lines.set(key, { entry, li });
    return entry;
  }

  function addTranslation(payload, translation) {
    let known = lines.get(keyOf(payload));
    if (!known) {
      upsertLine({ ...payload, text: payload.original || "" }, true);
      known = lines.get(keyOf(payload));
    }
    known.entry.translation = translation;
    const old = known.li.querySelector(".translation");
    if (old) old.remove();
    known.li.append(translationElement(known.entry));
  }

  function notice(text, kind) {
    hook.notices.push({ kind, text });
    const li = document.createElement("li");
    li.className = "notice";
    li.dataset.event = kind;
    li.textContent = text;
    list.append(li);
  }

  const HANDLERS = {
    "call.started": () => notice("Call started.", "call.started"),
    "transcript.partial": (p) => upsertLine(p, false),
    "transcript.final": (p) => upsertLine(p, true),
    "translation.final": (p) => addTranslation(p, { text: p.translated, lang: p.target_lang, error: null }),
    "translation.failed": (p) => addTranslation(p, { text: "", lang: p.target_lang, error: p.reason || "failed" }),
    "stt.failover": (p) => notice(
      `Speech recognition for ${speakerOf(p.track)} switched from ${p.from} to ${p.to}.`, "stt.failover"),
    "agent.joined": (p) => notice(`Agent ${p.agent_id || ""} joined.`.replace("  ", " "), "agent.joined"),
    "agent.left": (p) => {
      notice(`Agent ${p.agent_id || ""} left${p.reason ? ` (${p.reason})` : ""}.`.replace("  ", " "), "agent.left");
      // Our own session, ended by the server (replaced by another console, ICE failure): say so now
      // rather than wait for the browser's ICE consent timeout.  After Stop, `session` is already null.
      if (session && session.sessionId && p.session_id === session.sessionId) {
        release({ tellServer: false });
        closeEvents();
        hook.sessionId = null;
        move("failed", `the server ended this session (${p.reason || "no reason given"})`);
      }
    },
    "call.ended": (p) => {
      notice(p.reason ? `Call ended (${p.reason}).` : "Call ended.", "call.ended");
      closeEvents(); // the server ends the stream after call.ended; do not reconnect
    },
    "stream.gap": (p) => notice(`Some events were missed (ids ${p.lost_from}–${p.lost_to}).`, "stream.gap"),
  };

  // An EventSource cannot send the token as a header: the token buys a short-lived access_token for
  // this call (POST /api/calls/{id}/sse-token), which goes in the stream's URL.
  async function openEvents(callId, token) {
    closeEvents();
    const resp = await fetch(`/api/calls/${encodeURIComponent(callId)}/sse-token`, {
      method: "POST", headers: headers(token), body: "{}",
    });
    if (!resp.ok) throw new Error(await serverError(resp));
    const minted = (await resp.json()).data;
    const source = new EventSource(minted.url);
    for (const [name, handle] of Object.entries(HANDLERS)) {
      source.addEventListener(name, (ev) => {
        let payload;
        try {
          payload = JSON.parse(ev.data);
        } catch {
          console.warn(`console: ${name} event is not JSON`);
          return;
        }
        handle(payload);
      });
    }
    events = source;
  }

  function closeEvents() {
    if (events) events.close();
    events = null;
  }

  // ---- the WebRTC session ---------------------------------------------------------------------

  function headers(token) {
    const h = { "Content-Type": "application/json" };
    if (token) h.Authorization = `Bearer ${token}`;
    return h;
  }

  async function serverError(resp) {
    let message = "";
    try {
      const body = await resp.json();
      const error = body && body.error;
      message = error ? String(error.message || error) : ""; // the envelope, or a plain {"error": "..."}
    } catch {
      // not JSON: the status says enough
    }
    return `${message || resp.statusText || "request failed"} (HTTP ${resp.status})`;
  }

  function iceGatheringComplete(pc) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve, reject) => {
      const done = () => {
        clearTimeout(timer);
        pc.removeEventListener("icegatheringstatechange", check);
      };
      const check = () => {
        if (pc.iceGatheringState === "complete") {
          done();
          resolve();
        }
      };
      const timer = setTimeout(() => {
        done();
        // Without STUN/TURN servers gathering is quick; if it stalls, send what we have, if anything.
        if (/^a=candidate:/m.test(pc.localDescription.sdp)) resolve();
        else reject(new Error("no network candidates were gathered"));
      }, ICE_GATHERING_TIMEOUT_MS);
      pc.addEventListener("icegatheringstatechange", check);
    });
  }

  function readForm() {
    const callId = fields.callId.value.trim();
    const agentId = fields.agentId.value.trim();
    fields.callId.removeAttribute("aria-invalid");
    fields.agentId.removeAttribute("aria-invalid");
    if (!CALL_ID.test(callId)) {
      fields.callId.setAttribute("aria-invalid", "true");
      return { problem: "Call ID must be 1–256 letters, digits or : _ - .", field: fields.callId };
    }
    if (!agentId) {
      fields.agentId.setAttribute("aria-invalid", "true");
      return { problem: "Agent ID is required.", field: fields.agentId };
    }
    return { callId, agentId, token: fields.token.value, language: fields.language.value };
  }

  // opts.replace: end this agent's other live session (a crashed or reloaded browser) and take its place.
  async function start(opts = {}) {
    if (session) return;
    takeoverButton.hidden = true;
    const input = readForm();
    if (input.problem) {
      move("starting");
      move("failed", input.problem);
      input.field.focus();
      return;
    }
    const attempt = ++attempts;
    const current = () => session && session.attempt === attempt;
    session = { attempt, pc: null, mic: null, callId: input.callId, sessionId: null, token: input.token };
    hook.sessionId = null;
    hook.iceState = "new";
    hook.peerState = "new";
    move("starting");
    try {
      await openEvents(input.callId, input.token);
      const mic = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true }, video: false,
      });
      if (!current()) {
        mic.getTracks().forEach((t) => t.stop());
        return;
      }
      session.mic = mic;
      const pc = new RTCPeerConnection({ iceServers: [] }); // nothing leaves for a public STUN server
      session.pc = pc;
      watchPeer(pc, attempt);
      for (const track of mic.getAudioTracks()) pc.addTrack(track, mic);
      pc.addEventListener("track", (ev) => {
        audio.srcObject = ev.streams[0] || new MediaStream([ev.track]);
        audio.play().catch(() => notice("Press play on “Caller audio” to hear the caller.", "audio.blocked"));
      });
      move("gathering");
      await pc.setLocalDescription(await pc.createOffer());
      await iceGatheringComplete(pc);
      if (!current()) return;
      move("offering");
      const resp = await fetch("/api/webrtc/offer", {
        method: "POST",
        headers: headers(input.token),
        body: JSON.stringify({
          call_id: input.callId, agent_id: input.agentId, sdp: pc.localDescription.sdp, type: "offer",
          language: input.language, replace: Boolean(opts.replace),
        }),
      });
      if (!resp.ok) {
        if (resp.status === 409) takeoverButton.hidden = false; // the agent's other session is still live
        throw new Error(await serverError(resp));
      }
      const answer = (await resp.json()).data;
      if (!current()) {
        deleteSession(answer.session_id, input.token);
        return;
      }
      session.sessionId = answer.session_id;
      hook.sessionId = answer.session_id;
      await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
      if (current() && hook.state === "offering") move(pc.connectionState === "connected" ? "connected" : "connecting");
    } catch (err) {
      if (!current()) return;
      fail(err && err.message ? err.message : String(err));
    }
  }

  function watchPeer(pc, attempt) {
    const mine = () => session && session.attempt === attempt;
    pc.addEventListener("iceconnectionstatechange", () => {
      if (!mine()) return;
      hook.iceState = pc.iceConnectionState;
      render();
    });
    pc.addEventListener("connectionstatechange", () => {
      if (!mine()) return;
      hook.peerState = pc.connectionState;
      if (["gathering", "offering", "starting"].includes(hook.state)) {
        render();
        return;
      }
      if (pc.connectionState === "connected") move("connected");
      else if (pc.connectionState === "disconnected" && hook.state === "connected") move("connecting");
      else if (pc.connectionState === "failed") fail("the media connection failed (ICE)");
      else if (pc.connectionState === "closed") fail("the server closed the media connection");
      else render();
    });
  }

  const DELETE_WAIT_MS = 3000;

  function deleteSession(sessionId, token) {
    if (!sessionId) return Promise.resolve();
    // keepalive: the request outlives the page when the agent closes the tab.
    return fetch(`/api/webrtc/sessions/${encodeURIComponent(sessionId)}`, {
      method: "DELETE", headers: headers(token), keepalive: true,
    }).catch(() => {}); // best effort: the server also ends sessions whose peer goes away
  }

  // Ends the live session. The DELETE goes first and, when `waitForDelete`, is awaited (bounded) before
  // the peer connection closes: the server then ends the session for the DELETE rather than seeing the
  // peer vanish, and the DELETE does not meet an already-ended session (a 404).
  async function release({ waitForDelete = false, tellServer = true } = {}) {
    const s = session;
    session = null;
    if (!s) return;
    if (s.mic) s.mic.getTracks().forEach((t) => t.stop()); // the microphone goes quiet at once
    const deleted = tellServer ? deleteSession(s.sessionId, s.token) : Promise.resolve();
    if (waitForDelete) {
      await Promise.race([deleted, new Promise((resolve) => setTimeout(resolve, DELETE_WAIT_MS))]);
    }
    if (s.pc) s.pc.close();
    audio.srcObject = null;
  }

  function fail(message) {
    // A peer connection the server closed needs no DELETE: the session is already over there.
    const closedByServer = session && session.pc && session.pc.connectionState === "closed";
    release({ tellServer: !closedByServer });
    closeEvents();
    hook.sessionId = null;
    move("failed", message);
  }

  async function stop() {
    if (!session) return;
    const ending = release({ waitForDelete: true });
    closeEvents();
    hook.sessionId = null;
    move("stopping");
    await ending;
    move("stopped");
  }

  // ---- wiring ---------------------------------------------------------------------------------

  function prefill() {
    const params = new URLSearchParams(window.location.search);
    if (params.has("call_id")) fields.callId.value = params.get("call_id");
    if (params.has("agent_id")) fields.agentId.value = params.get("agent_id");
    if (params.has("token")) fields.token.value = params.get("token");
    if (["en", "es"].includes(params.get("language"))) fields.language.value = params.get("language");
    if (params.has("token")) {
      // Keep the secret out of the address bar, history and bookmarks from here on.
      params.delete("token");
      const query = params.toString();
      history.replaceState(null, "", `${window.location.pathname}${query ? `?${query}` : ""}`);
    }
    return params.get("autostart") === "1";
  }

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    start();
  });
  stopButton.addEventListener("click", stop);
  takeoverButton.addEventListener("click", () => start({ replace: true }));
  window.addEventListener("pagehide", () => {
    release();
    closeEvents();
  });

  render();
  if (prefill()) start();
})();
