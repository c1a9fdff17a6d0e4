// fewshot playground, "Report" panel: will this namespace's classes work? (GET /v1/report)
// Loaded after app.js and uses its api(), run() and state; everything it shows is textContent.
"use strict";

const NEEDS_TEXT = {
  more_shots: "needs more shots",
  cleaner_shots: "check its shots: some look like another class",
};

const reportPercent = (value) => (value === null || value === undefined ? "–" : `${Math.round(value * 100)}%`);

function reportElement(tag, className, text) {
  const element = document.createElement(tag);
  if (className) element.className = className;
  if (text !== undefined) element.textContent = text;
  return element;
}

async function loadReport() {
  const button = $("report-button");
  button.disabled = true;
  try {
    renderReport(await api("GET", "report"));
  } finally {
    button.disabled = false;
  }
}

function renderReport(report) {
  const container = $("report");
  container.replaceChildren();
  const summary = reportElement("p", "report-summary");
  const judged = report.sampled
    ? ` A sample was judged: ${report.judged_examples} of ${report.examples} examples.`
    : "";
  summary.textContent = report.expected_accuracy === null
    ? `${report.classes} class(es), ${report.examples} example(s): add a second example to a class ` +
      "to judge it."
    : `Expected accuracy ${reportPercent(report.expected_accuracy)} at ${report.classes} classes ` +
      `(each example classified without itself; ${report.examples} examples).${judged}`;
  container.append(summary);

  const table = reportElement("table", "report-classes");
  const titles = ["class", "shots", "accuracy", "closest class", "advice"];
  const head = table.createTHead().insertRow();
  for (const title of titles) head.append(reportElement("th", "", title));
  const body = table.createTBody();
  for (const judged of report.per_class) {
    const row = body.insertRow();
    row.dataset.label = judged.label;
    const label = reportElement("td", "report-label", judged.label);
    label.title = judged.label; // long labels are cut; the whole one on hover
    row.append(label, reportElement("td", "num", String(judged.count)));
    const accuracy = reportElement("td", "report-accuracy");
    const bar = reportElement("span", "report-bar");
    const fill = reportElement("span", "report-fill");
    fill.style.width = `${(judged.loo_accuracy ?? 0) * 100}%`;
    if (judged.loo_accuracy !== null && judged.loo_accuracy < 0.5) fill.classList.add("low");
    bar.append(fill);
    accuracy.append(bar, reportElement("span", "num", reportPercent(judged.loo_accuracy)));
    row.append(accuracy);
    row.append(reportElement("td", "", judged.nearest_label === null
      ? "–"
      : `${judged.nearest_label} (${judged.nearest_similarity.toFixed(2)})`));
    const advice = reportElement("td", "report-needs");
    for (const need of judged.needs) advice.append(reportElement("span", `need ${need}`, NEEDS_TEXT[need] || need));
    if (judged.suspect_example_ids.length) {
      advice.append(reportElement("span", "muted",
        ` suspect example(s): ${judged.suspect_example_ids.join(", ")}`));
    }
    if (!advice.childNodes.length) advice.textContent = "ok";
    row.append(advice);
    // On a phone each row is a card; every cell carries its column's name (report.css).
    [...row.cells].forEach((cell, i) => { cell.dataset.title = titles[i]; });
  }
  container.append(table);

  const confused = report.confused_pairs.filter((pair) => pair.a_as_b + pair.b_as_a > 0);
  const pairs = reportElement("div", "report-pairs");
  pairs.append(reportElement("h3", "", "Most confused pairs"));
  if (!confused.length) pairs.append(reportElement("p", "muted", "No example was taken for another class."));
  for (const pair of confused) {
    pairs.append(reportElement("p", "report-pair",
      `${pair.a} ↔ ${pair.b}: ${pair.a_as_b} of ${pair.a} taken for ${pair.b}, ` +
      `${pair.b_as_a} of ${pair.b} taken for ${pair.a} (prototype similarity ${pair.similarity.toFixed(2)})`));
  }
  container.append(pairs);
}

function initReport() {
  $("report-button").addEventListener("click", () => run(loadReport));
  // A report belongs to one namespace: switching clears it.
  $("settings-form").addEventListener("submit", () => $("report").replaceChildren());
}

initReport();
