// The page of `lit-longctx serve`: streams /v1/completions (server-sent events) into #output.
"use strict";

const $ = (id) => document.getElementById(id);
let controller = null;

function numberOrNull(id) {
  const v = $(id).value.trim();
  return v === "" ? null : Number(v);
}

async function countPromptTokens() {
  const r = await fetch("/tokens", { method: "POST", headers: { "Content-Type": "application/json" },
                                     body: JSON.stringify({ text: $("prompt").value, bos: true }) });
  if (r.ok) $("prompt-tokens").textContent = (await r.json()).count;
}

async function showModel() {
  const r = await fetch("/v1/models");
  const m = (await r.json()).data[0];
  const limit = m.max_prompt_tokens === null ? "unbounded" : m.max_prompt_tokens;
  $("model").textContent = `${m.id}: method ${m.method}, session ${m.session}, prompts up to ${limit} tokens`;
}

async function generate(event) {
  event.preventDefault();
  $("output").textContent = "";
  $("error").textContent = "";
  $("token-count").textContent = "0";
  $("status").textContent = "(streaming)";
  $("submit").disabled = true;
  $("stop").disabled = false;
  const body = { prompt: $("prompt").value, max_tokens: numberOrNull("max_tokens") ?? 16,
                 temperature: numberOrNull("temperature") ?? 0, stream: true };
  for (const key of ["top_k", "top_p", "seed"]) {
    const v = numberOrNull(key);
    if (v !== null) body[key] = v;
  }
  controller = new AbortController();
  let tokens = 0;
  try {
    const r = await fetch("/v1/completions", { method: "POST", headers: { "Content-Type": "application/json" },
                                               body: JSON.stringify(body), signal: controller.signal });
    if (!r.ok) {
      $("error").textContent = (await r.json()).error.message;
      return;
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const line = buffer.slice(0, end).replace(/^data: /, "");
        buffer = buffer.slice(end + 2);
        if (line === "[DONE]") continue;
        const chunk = JSON.parse(line);
        if (chunk.error) {
          $("error").textContent = chunk.error.message;
          continue;
        }
        $("output").textContent += chunk.choices[0].text;
        if (chunk.choices[0].finish_reason === null) tokens += 1;
        $("token-count").textContent = String(tokens);
      }
    }
    $("status").textContent = "(done)";
  } catch (e) {
    $("status").textContent = e.name === "AbortError" ? "(stopped)" : "";
    if (e.name !== "AbortError") $("error").textContent = String(e);
  } finally {
    $("submit").disabled = false;
    $("stop").disabled = true;
  }
}

$("form").addEventListener("submit", generate);
$("stop").addEventListener("click", () => controller && controller.abort());
$("prompt").addEventListener("input", countPromptTokens);
showModel();
countPromptTokens();
