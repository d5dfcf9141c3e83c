// pgmfa approval page: the browser side of passkeys (WebAuthn). The page's
// TOTP forms work without this script; it only adds the passkey buttons,
// which stay hidden where it does not run.
//
// The server speaks JSON with binary fields in base64url (go-webauthn's
// encoding); navigator.credentials wants ArrayBuffers: b64u converts.
"use strict";
(function () {
  function enc(buf) {
    let s = "";
    for (const b of new Uint8Array(buf)) s += String.fromCharCode(b);
    return btoa(s).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }
  function dec(str) {
    str = str.replace(/-/g, "+").replace(/_/g, "/");
    while (str.length % 4) str += "=";
    const bin = atob(str);
    const out = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
    return out.buffer;
  }
  function csrf() {
    const el = document.querySelector("input[name=csrf]");
    return el ? el.value : "";
  }
  async function post(url, body) {
    const r = await fetch(url, {
      method: "POST", credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf() },
      body: JSON.stringify(body),
    });
    let j = {};
    try { j = await r.json(); } catch (e) { /* not JSON: say the status */ }
    if (!r.ok) throw new Error(j.error || "the page answered " + r.status);
    return j;
  }
  function say(msg, bad) {
    const el = document.getElementById("passkey-status");
    el.textContent = msg;
    el.setAttribute("role", bad ? "alert" : "status");
  }
  function ids(list) {
    for (const c of list || []) c.id = dec(c.id);
  }

  async function register() {
    const base = location.pathname; // /enroll/TOKEN
    const pk = (await post(base + "/begin", {})).publicKey;
    pk.challenge = dec(pk.challenge);
    pk.user.id = dec(pk.user.id);
    ids(pk.excludeCredentials);
    const cred = await navigator.credentials.create({ publicKey: pk });
    const r = cred.response;
    const res = await post(base + "/finish", {
      id: cred.id, rawId: enc(cred.rawId), type: cred.type,
      response: {
        attestationObject: enc(r.attestationObject), clientDataJSON: enc(r.clientDataJSON),
        transports: r.getTransports ? r.getTransports() : [],
      },
      clientExtensionResults: cred.getClientExtensionResults(),
    });
    say(res.message, false);
    document.getElementById("passkey-register").hidden = true;
  }

  async function signIn(token) {
    const pk = (await post("/passkey/begin", { token: token })).publicKey;
    pk.challenge = dec(pk.challenge);
    ids(pk.allowCredentials);
    const a = await navigator.credentials.get({ publicKey: pk });
    const r = a.response;
    const body = {
      id: a.id, rawId: enc(a.rawId), type: a.type,
      response: { authenticatorData: enc(r.authenticatorData), clientDataJSON: enc(r.clientDataJSON), signature: enc(r.signature) },
      clientExtensionResults: a.getClientExtensionResults(),
    };
    if (r.userHandle) body.response.userHandle = enc(r.userHandle);
    const res = await post("/passkey/finish", body);
    location.assign(res.redirect || "/");
  }

  function wire(id, run) {
    const btn = document.getElementById(id);
    if (!btn) return;
    if (!window.PublicKeyCredential) {
      say("This browser does not support passkeys: use the code from your authenticator app.", true);
      return;
    }
    btn.hidden = false;
    btn.addEventListener("click", async () => {
      btn.disabled = true;
      say("Waiting for your passkey…", false);
      try {
        await run(btn);
      } catch (e) {
        say(e.name === "NotAllowedError" ? "The passkey prompt was cancelled or timed out." : e.message, true);
      } finally {
        btn.disabled = false;
      }
    });
  }
  wire("passkey-register", register);
  wire("passkey-signin", (btn) => signIn(btn.dataset.token || ""));
})();
