/*
 * Switchboard agent console.
 *
 * Sign-in: the page asks GET /api/auth/me; without a session (401) it shows the sign-in form, which
 * POSTs /api/auth/login {email, password}. The server answers with an HttpOnly cookie (sb_session),
 * which from then on authenticates everything this same-origin page does: the event stream, the
 * WebRTC offer, its DELETE. The page never sees or stores a token. Sign out POSTs /api/auth/logout.
 * A 401 from any call later (the session expired or was revoked) ends the live session and returns
 * to the sign-in form, saying why.
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
 * Test hook: window.switchboard = {state, sessionId, iceState, peerState, error, transcripts, notices,
 * signedIn, user}.
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
  const fields = { callId: $("call-id"), language: $("language") };
  const startButton = $("start");
  const stopButton = $("stop");
  const takeoverButton = $("takeover");
  const statusLine = $("status");
  const audio = $("caller-audio");
  const list = $("transcript");
  const loginSection = $("login-section");
  const loginForm = $("login-form");
  const loginFields = { email: $("email"), password: $("password") };
  const signInButton = $("sign-in");
  const loginStatus = $("login-status");
  const app = $("app");
  const who = $("who");
  const whoText = $("who-text");
  const signOutButton = $("sign-out");

  const hook = {
    state: "idle", sessionId: null, iceState: "new", peerState: "new", error: null,
    transcripts: [], notices: [], signedIn: false, user: null,
  };
  window.switchboard = hook;

  // The live session: everything Stop must undo.
  let session = null; // {attempt, pc, mic, callId, sessionId}
  let me = null; // GET /api/auth/me's data: {user, org, role, kind}
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
    if (entry.language) text.lang = entry.language; // what the track was recognised in (bilingual calls differ)
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
      text: "", language: null, final: false, translation: null,
    };
    entry.text = payload.text || "";
    entry.language = payload.language || entry.language || null;
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
      upsertLine({ ...payload, text: payload.original || "", language: payload.source_lang }, true);
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

  function openEvents(callId) {
    closeEvents();
    const source = new EventSource(`/api/calls/${encodeURIComponent(callId)}/events`);
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
    // A refused stream (401: the session ended) closes the EventSource for good; a dropped one retries.
    source.addEventListener("error", () => {
      if (source.readyState === EventSource.CLOSED && events === source) checkStillSignedIn();
    });
    events = source;
  }

  function closeEvents() {
    if (events) events.close();
    events = null;
  }

  // ---- the WebRTC session ---------------------------------------------------------------------

  const JSON_HEADERS = { "Content-Type": "application/json" };

  // The server's words for a failed request: the envelope's error.message ({success: false, error:
  // {code, message}}), or an older plain {error: "..."}.
  async function errorMessage(resp) {
    try {
      const body = await resp.json();
      const error = body && body.error;
      if (error && typeof error === "object" && error.message) return String(error.message);
      if (typeof error === "string") return error;
    } catch {
      // not JSON: the status says enough
    }
    return resp.statusText || "request failed";
  }

  async function serverError(resp) {
    return `${await errorMessage(resp)} (HTTP ${resp.status})`;
  }

  // Thrown when a call answers 401: the session is over; the page returns to the sign-in form.
  class SessionEnded extends Error {}

  async function api(path, init = {}) {
    const resp = await fetch(path, { credentials: "same-origin", ...init });
    if (resp.status === 401) {
      sessionExpired();
      throw new SessionEnded("your session has expired");
    }
    return resp;
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
    fields.callId.removeAttribute("aria-invalid");
    if (!CALL_ID.test(callId)) {
      fields.callId.setAttribute("aria-invalid", "true");
      return { problem: "Call ID must be 1–256 letters, digits or : _ - .", field: fields.callId };
    }
    return { callId, language: fields.language.value };
  }

  // opts.replace: end this agent's other live session (a crashed or reloaded browser) and take its place.
  async function start(opts = {}) {
    if (session || !me) return;
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
    session = { attempt, pc: null, mic: null, callId: input.callId, sessionId: null };
    hook.sessionId = null;
    hook.iceState = "new";
    hook.peerState = "new";
    move("starting");
    openEvents(input.callId);
    try {
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
      // The session cookie says who the agent is; agent_id (the signed-in address) is only a label
      // for servers that still read it.
      const resp = await api("/api/webrtc/offer", {
        method: "POST",
        headers: JSON_HEADERS,
        body: JSON.stringify({
          call_id: input.callId, agent_id: me.user.email, sdp: pc.localDescription.sdp, type: "offer",
          language: input.language, replace: Boolean(opts.replace),
        }),
      });
      if (!resp.ok) {
        if (resp.status === 409) takeoverButton.hidden = false; // the agent's other session is still live
        throw new Error(await serverError(resp));
      }
      const answer = (await resp.json()).data; // the envelope: {success, data: {session_id, type, sdp}}
      if (!current()) {
        deleteSession(answer.session_id);
        return;
      }
      session.sessionId = answer.session_id;
      hook.sessionId = answer.session_id;
      await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
      if (current() && hook.state === "offering") move(pc.connectionState === "connected" ? "connected" : "connecting");
    } catch (err) {
      if (err instanceof SessionEnded || !current()) return;
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

  function deleteSession(sessionId) {
    if (!sessionId) return Promise.resolve();
    // keepalive: the request outlives the page when the agent closes the tab.
    return fetch(`/api/webrtc/sessions/${encodeURIComponent(sessionId)}`, {
      method: "DELETE", credentials: "same-origin", keepalive: true,
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
    const deleted = tellServer ? deleteSession(s.sessionId) : Promise.resolve();
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

  // ---- signing in and out ------------------------------------------------------------------------

  function say(text, kind = "info") {
    loginStatus.textContent = text;
    loginStatus.dataset.kind = kind;
  }

  function showLogin(message = "", kind = "info") {
    me = null;
    hook.signedIn = false;
    hook.user = null;
    app.hidden = true;
    who.hidden = true;
    loginSection.hidden = false;
    signInButton.disabled = false;
    loginFields.password.value = "";
    say(message, kind);
    (loginFields.email.value ? loginFields.password : loginFields.email).focus();
  }

  function showApp(data) {
    me = data;
    hook.signedIn = true;
    hook.user = data.user.email;
    const org = data.org && data.org.name ? ` · ${data.org.name}` : "";
    whoText.textContent = `Signed in as ${data.user.email} (${data.role})${org}`;
    say("");
    loginSection.hidden = true;
    who.hidden = false;
    app.hidden = false;
    render();
  }

  // Who is signed in: the data of GET /api/auth/me, null without a session; throws on other failures.
  async function whoAmI() {
    const resp = await fetch("/api/auth/me", { credentials: "same-origin" });
    if (resp.status === 401) return null;
    if (!resp.ok) throw new Error(await serverError(resp));
    return (await resp.json()).data;
  }

  function endLiveSession(reason) {
    release({ tellServer: false });
    closeEvents();
    hook.sessionId = null;
    if (!["idle", "stopped", "failed"].includes(hook.state)) move("failed", reason);
  }

  function sessionExpired() {
    if (!me) return;
    endLiveSession("your session expired");
    showLogin("Your session has expired. Sign in again to continue.", "error");
  }

  async function checkStillSignedIn() {
    try {
      if ((await whoAmI()) === null) sessionExpired();
    } catch {
      // the server is unreachable: the event stream's own error says enough
    }
  }

  async function signIn() {
    const email = loginFields.email.value.trim();
    const password = loginFields.password.value;
    for (const input of Object.values(loginFields)) input.removeAttribute("aria-invalid");
    if (!email || !password) {
      const field = email ? loginFields.password : loginFields.email;
      field.setAttribute("aria-invalid", "true");
      say(email ? "Enter your password." : "Enter your e-mail address.", "error");
      field.focus();
      return;
    }
    signInButton.disabled = true;
    say("Signing in…");
    try {
      const resp = await fetch("/api/auth/login", {
        method: "POST", headers: JSON_HEADERS, credentials: "same-origin", body: JSON.stringify({ email, password }),
      });
      if (!resp.ok) {
        const message = await errorMessage(resp);
        loginFields.password.setAttribute("aria-invalid", "true");
        loginFields.password.value = "";
        say(`Sign-in failed: ${message}`, "error");
        loginFields.password.focus();
        return;
      }
      const data = await whoAmI(); // the cookie is set: the canonical view of who this is
      if (data === null) throw new Error("the server did not keep the session (are cookies blocked?)");
      loginFields.password.value = "";
      showApp(data);
      fields.callId.focus();
      if (autostart) {
        autostart = false;
        start();
      }
    } catch (err) {
      say(`Sign-in failed: ${err && err.message ? err.message : String(err)}`, "error");
    } finally {
      signInButton.disabled = false;
    }
  }

  async function signOut() {
    if (session) await stop();
    closeEvents();
    try {
      await fetch("/api/auth/logout", {
        method: "POST", headers: JSON_HEADERS, credentials: "same-origin", body: "{}",
      });
    } catch {
      // the cookie may outlive an unreachable server; the page forgets the session regardless
    }
    showLogin("Signed out.");
  }

  // ---- wiring ---------------------------------------------------------------------------------

  function prefill() {
    const params = new URLSearchParams(window.location.search);
    if (params.has("call_id")) fields.callId.value = params.get("call_id");
    if (["en", "es"].includes(params.get("language"))) fields.language.value = params.get("language");
    return params.get("autostart") === "1";
  }

  form.addEventListener("submit", (ev) => {
    ev.preventDefault();
    start();
  });
  loginForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    signIn();
  });
  signOutButton.addEventListener("click", signOut);
  stopButton.addEventListener("click", stop);
  takeoverButton.addEventListener("click", () => start({ replace: true }));
  window.addEventListener("pagehide", () => {
    release();
    closeEvents();
  });

  render();
  let autostart = prefill(); // once signed in
  whoAmI().then((data) => {
    if (data === null) {
      showLogin();
      return;
    }
    showApp(data);
    if (autostart) {
      autostart = false;
      start();
    }
  }).catch((err) => showLogin(`Cannot reach the server: ${err && err.message ? err.message : String(err)}`, "error"));
})();
