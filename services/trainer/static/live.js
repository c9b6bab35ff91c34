// The live panel: the console's /ui/stream (the predictor's signal stream, relayed with the signed-in key) into
// the table. Text only (textContent): nothing from the stream is ever parsed as HTML.
"use strict";
(function () {
  const table = document.getElementById("signals");
  const state = document.getElementById("stream-state");
  if (!table || !state) return;
  const source = new EventSource(table.dataset.stream);

  function cell(row, text, cls) {
    const td = row.insertCell();
    td.textContent = text;
    if (cls) td.className = cls;
  }

  source.addEventListener("status", (e) => {
    state.textContent = JSON.parse(e.data).detail;
  });
  source.addEventListener("signal", (e) => {
    const s = JSON.parse(e.data);
    const row = table.insertRow(1);
    row.className = "fresh";
    row.dataset.predictionId = s.prediction_id;
    cell(row, new Date().toISOString().replace("T", " ").slice(0, 19) + " UTC");
    cell(row, s.symbol + " " + s.timeframe);
    cell(row, s.bar_ts);
    cell(row, s.signal, s.signal);
    cell(row, (s.confidence * 100).toFixed(1) + " %", "n");
    cell(row, s.model_version);
    cell(row, s.variant);
    cell(row, s.prediction_id);
    state.textContent = "last signal " + s.symbol + " " + s.timeframe + " at bar " + s.bar_ts;
  });
  source.addEventListener("error", (e) => {
    // A server-sent `event: error` carries a reason; a bare error is the connection (EventSource reconnects).
    state.textContent = e.data ? JSON.parse(e.data).detail : "connection lost; reconnecting…";
  });
})();
