// Training: upload a dataset (the validator's errors by line), start a job with its
// hyperparameters, follow its loss curve live, then chat with the result.

import { api, events, getJson } from "./api.js";
import { clear, formatTime, h, table } from "./dom.js";
import { lineChart } from "./charts.js";

const CHAT_SETTINGS = "locopilot.chat-settings";

function number(id, value, attrs) {
  return h("input", { id, type: "number", value, ...attrs });
}

/** A number field's value, or "auto" when it is empty. */
function auto(input) {
  return input.value === "" ? "auto" : Number(input.value);
}

function loss(value) {
  return typeof value === "number" ? value.toFixed(4) : "–";
}

function outcome(answer) {
  if (answer.base_correct) return answer.trained_correct ? "kept" : "lost";
  return answer.trained_correct ? "gained" : "wrong before and after";
}

/** What a finished job reports: its losses before and after, and the spot check's answers. */
export function jobResult(result) {
  const part = h("div", { id: "job-result" });
  const rows = [["Training loss", loss(result.train_loss_before), loss(result.train_loss_after)]];
  if (result.validation_loss_before !== undefined && result.validation_loss_before !== null) {
    rows.push(["Held-out loss", loss(result.validation_loss_before), loss(result.validation_loss_after)]);
  }
  part.append(h("div", { id: "job-eval" }, table("Evaluation", ["Measure", "Before training", "After"], rows)));
  const facts = [];
  if (result.trained_tokens) facts.push(`${result.trained_tokens} tokens trained`);
  if (result.tokens_per_s) facts.push(`${Math.round(result.tokens_per_s)} tokens/s`);
  if (result.seconds) facts.push(`${Math.round(result.seconds)} s in all`);
  if (facts.length) part.append(h("p", {}, `${facts.join(", ")}.`));
  const check = result.spot_check;
  if (check && Array.isArray(check.answers)) {
    const answers = check.answers.map((a) => [a.question, a.expected, a.base_answer, a.trained_answer, h("span", { class: `outcome ${outcome(a).split(" ")[0]}` }, outcome(a))]);
    const caption = `Spot check: ${check.base_correct} of ${check.answers.length} right before training, ${check.trained_correct} after, ${check.lost} lost`;
    part.append(h("div", { id: "spot-check" }, table(caption, ["Question", "Expected", "Base answer", "Tuned answer", "Outcome"], answers)));
  }
  return part;
}

export async function trainingPage(root) {
  const status = h("p", { role: "status", id: "training-status" });
  const uploadProblem = h("pre", { class: "problem", role: "alert", id: "upload-error" });
  const file = h("input", { id: "dataset-file", type: "file", accept: ".jsonl,application/jsonl,application/json", required: true });
  const upload = h(
    "form",
    { class: "panel", "aria-label": "Upload a dataset" },
    h("h3", {}, "Upload a dataset"),
    h("p", {}, "JSON Lines: one chat ({\"messages\": [...]}) or prompt/completion pair per line."),
    h("label", { for: "dataset-file" }, "Dataset file"),
    file,
    h("div", { class: "buttons" }, h("button", { type: "submit", id: "dataset-upload" }, "Upload")),
    uploadProblem,
  );

  const base = h("select", { id: "job-model" });
  const dataset = h("select", { id: "job-file" });
  // Empty is "auto": the server picks from the dataset's and the model's size (and says what it chose).
  const epochs = number("job-epochs", "", { min: 1, max: 100, placeholder: "auto" });
  const rate = number("job-learning-rate", "", { min: 0, max: 0.01, step: "any", placeholder: "auto" });
  const layers = number("job-layers", "", { min: 0, max: 1024, placeholder: "auto" });
  const context = number("job-context", 256, { min: 256, step: 256 });
  const output = h("select", { id: "job-output" }, ["q8_0", "f16", "f32", "q4_k_m", "q5_k_m", "q6_k"].map((v) => h("option", { value: v }, v)));
  const jobProblem = h("p", { class: "error", role: "alert", id: "job-error" });
  const start = h(
    "form",
    { class: "panel", "aria-label": "Start a job" },
    h("h3", {}, "Start a fine-tuning job"),
    h(
      "div",
      { class: "grid" },
      h("label", { for: "job-model" }, "Base model"),
      base,
      h("label", { for: "job-file" }, "Dataset"),
      dataset,
      h("label", { for: "job-epochs" }, "Epochs"),
      epochs,
      h("label", { for: "job-learning-rate" }, "Learning rate"),
      rate,
      h("label", { for: "job-layers" }, "Layers (last N; 0: all; empty: auto)"),
      layers,
      h("label", { for: "job-context" }, "Context (tokens)"),
      context,
      h("label", { for: "job-output" }, "Output type"),
      output,
    ),
    h("div", { class: "buttons" }, h("button", { type: "submit", id: "job-start" }, "Start")),
    jobProblem,
  );
  const jobs = h("div", { id: "jobs-list" });
  const detail = h("section", { id: "job-detail", "aria-label": "Job" });
  root.append(h("h2", {}, "Training"), status, upload, start, jobs, detail);

  let following = null;

  async function refreshChoices() {
    try {
      const [models, files] = await Promise.all([getJson("/v1/models"), getJson("/v1/files?purpose=fine-tune")]);
      const keep = [base.value, dataset.value];
      clear(base).append(...models.data.filter((m) => m.provider === "embedded").map((m) => h("option", { value: m.id }, m.id)));
      clear(dataset).append(...files.data.map((f) => h("option", { value: f.id }, `${f.filename} (${f.id})`)));
      if (keep[0]) base.value = keep[0];
      if (keep[1]) dataset.value = keep[1];
    } catch (error) {
      status.textContent = `Models or files could not be listed: ${error.message}`;
    }
  }

  async function refreshJobs() {
    try {
      const found = await getJson("/v1/locopilot/training/jobs");
      const rows = found.data.map((job) => [
        h("button", { type: "button", class: "link", "aria-label": `Follow ${job.id}`, onclick: () => follow(job.id) }, job.id),
        job.model,
        job.status,
        `${Math.round(job.progress * 100)} %`,
        job.fine_tuned_model || "",
        formatTime(job.created_at),
      ]);
      clear(jobs).append(table("Jobs, newest first", ["Job", "Base", "Status", "Progress", "Result", "Created"], rows));
    } catch (error) {
      status.textContent = `Jobs could not be listed: ${error.message}`;
    }
  }

  async function follow(jobId) {
    if (following) following.abort();
    const controller = new AbortController();
    following = controller;
    const points = [];
    const chart = h("div", { id: "loss-chart" }, lineChart("Training loss by step", points));
    const state = h("p", { role: "status", id: "job-state" }, "Following…");
    const log = h("ol", { class: "job-log", id: "job-log" });
    clear(detail).append(h("h3", {}, `Job ${jobId}`), state, chart, log);
    try {
      const response = await api(`/v1/locopilot/training/jobs/${encodeURIComponent(jobId)}/logs`, { signal: controller.signal });
      for await (const { event, data } of events(response)) {
        if (event === "metrics" && data.data && typeof data.data.train_loss === "number") {
          points.push([data.data.step, data.data.train_loss]);
          clear(chart).append(lineChart("Training loss by step", points));
          const eta = data.data.eta_s ? `, about ${Math.ceil(data.data.eta_s)} s left` : "";
          state.textContent = `Step ${data.data.step} of ${data.data.total_steps}: loss ${data.data.train_loss.toFixed(4)}${eta}`;
        }
        if (event === "message" || event === "metrics") log.append(h("li", {}, data.message));
        if (event === "end") {
          state.textContent = `The job ${data.status}.${data.error ? ` ${data.error.message}` : ""}`;
          if (data.result) detail.append(jobResult(data.result));
          if (data.fine_tuned_model) {
            const chat = h("button", { type: "button", id: "job-chat" }, `Chat with ${data.fine_tuned_model}`);
            chat.addEventListener("click", () => {
              let settings = {};
              try {
                settings = JSON.parse(localStorage.getItem(CHAT_SETTINGS) || "{}");
              } catch {
                // start from nothing
              }
              localStorage.setItem(CHAT_SETTINGS, JSON.stringify({ ...settings, model: data.fine_tuned_model }));
              location.hash = "#/chat";
            });
            detail.append(chat);
          }
        }
        if (event === "error") state.textContent = data.message || "The log stream ended.";
      }
    } catch (error) {
      if (error.name !== "AbortError") state.textContent = `The job could not be followed: ${error.message}`;
    } finally {
      if (following === controller) following = null;
      await refreshJobs();
    }
  }

  upload.addEventListener("submit", async (event) => {
    event.preventDefault();
    uploadProblem.textContent = "";
    if (!file.files.length) return;
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", file.files[0]);
    try {
      const stored = await getJson("/v1/files", { method: "POST", form });
      status.textContent = `Uploaded ${stored.filename}: ${stored.id}.`;
      await refreshChoices();
      dataset.value = stored.id;
    } catch (error) {
      uploadProblem.textContent = error.message;
    }
  });

  start.addEventListener("submit", async (event) => {
    event.preventDefault();
    jobProblem.textContent = "";
    const body = {
      model: base.value,
      training_file: dataset.value,
      epochs: auto(epochs),
      learning_rate: auto(rate),
      layers: auto(layers),
      context: Number(context.value),
      output_type: output.value,
    };
    try {
      const job = await getJson("/v1/locopilot/training/jobs", { method: "POST", body });
      status.textContent = `Started ${job.id}.`;
      await refreshJobs();
      follow(job.id);
    } catch (error) {
      jobProblem.textContent = error.message;
    }
  });

  window.addEventListener("hashchange", () => following && following.abort(), { once: true });
  await Promise.all([refreshChoices(), refreshJobs()]);
}
