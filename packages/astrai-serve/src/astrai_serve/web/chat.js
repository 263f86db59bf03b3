// The chat page of `astrai serve`: a conversation streamed from this server's own
// /v1/chat/completions (server-sent events), with a system prompt, sampling settings, stop,
// clear and the API key. Plain JavaScript, no build step and nothing fetched from elsewhere.
"use strict";

const $ = (id) => document.getElementById(id);
const SETTINGS = ["system", "temperature", "top_p", "max_tokens", "seed"];
const chat = { messages: [], model: null, controller: null };

function authHeaders() {
  const headers = { "Content-Type": "application/json" };
  const key = $("api_key").value.trim();
  if (key) headers.Authorization = "Bearer " + key;
  return headers;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function loadModel() {
  try {
    const response = await fetch("v1/models", { headers: authHeaders() });
    if (response.status === 401) {
      $("model").textContent = "this server needs an API key: enter it below";
      return;
    }
    const body = await response.json();
    chat.model = body.data[0].id;
    $("model").textContent = chat.model;
  } catch (err) {
    $("model").textContent = "cannot reach the server";
  }
}

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = "msg " + role;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "you" : "assistant";
  const body = document.createElement("span");
  body.className = "text";
  body.textContent = text;
  box.append(who, body);
  $("messages").append(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

function addNote(box, text) {
  const note = document.createElement("span");
  note.className = "note";
  note.textContent = text;
  box.append(note);
}

function setBusy(busy) {
  document.body.dataset.busy = busy ? "1" : "0";
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  const body = { messages: messages.concat(chat.messages), stream: true };
  if (chat.model) body.model = chat.model;
  for (const name of ["temperature", "top_p", "max_tokens", "seed"]) {
    const value = $(name).value.trim();
    if (value !== "") body[name] = Number(value);
  }
  return body;
}

// Each event is "data: {json}" followed by a blank line; "data: [DONE]" ends the stream.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  showError("");
  chat.messages.push({ role: "user", content: text });
  const userBox = addMessage("user", text);
  const box = addMessage("assistant", "");
  const out = box.querySelector(".text");
  box.classList.add("streaming");
  chat.controller = new AbortController();
  setBusy(true);
  let reply = "";
  let finish = null;
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: authHeaders(), body: JSON.stringify(requestBody()),
      signal: chat.controller.signal,
    });
    if (!response.ok) {
      const body = await response.json().catch(() => null);
      throw new Error((body && body.error && body.error.message) || "HTTP " + response.status);
    }
    for await (const event of events(response)) {
      if (event.error) throw new Error(event.error.message);
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      const piece = choice.delta && choice.delta.content;
      if (piece) {
        reply += piece;
        out.textContent = reply;
        box.scrollIntoView({ block: "end" });
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    if (finish === "length") addNote(box, "cut off at max tokens");
  } catch (err) {
    if (err.name === "AbortError") {
      addNote(box, "stopped");
    } else {
      showError(err.message);
      box.classList.add("failed");
      userBox.classList.add("failed");
    }
  } finally {
    box.classList.remove("streaming");
    if (reply) {
      chat.messages.push({ role: "assistant", content: reply });
    } else if (chat.messages[chat.messages.length - 1].content === text) {
      chat.messages.pop(); // nothing came back: the turn is not part of the conversation
    }
    chat.controller = null;
    setBusy(false);
  }
}

function clearChat() {
  if (chat.controller) chat.controller.abort();
  chat.messages = [];
  $("messages").replaceChildren();
  showError("");
}

function restoreSettings() {
  for (const name of SETTINGS) {
    const saved = localStorage.getItem("astrai." + name);
    if (saved !== null) $(name).value = saved;
    $(name).addEventListener("change", () => localStorage.setItem("astrai." + name, $(name).value));
  }
  // The key stays in this tab only (sessionStorage), not on disk for every visitor after.
  $("api_key").value = sessionStorage.getItem("astrai.api_key") || "";
  $("api_key").addEventListener("change", () => {
    sessionStorage.setItem("astrai.api_key", $("api_key").value);
    loadModel();
  });
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || chat.controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => chat.controller && chat.controller.abort());
$("clear").addEventListener("click", clearChat);
restoreSettings();
setBusy(false);
loadModel();
