-- Which engine wrote a call's summary (pipelines/summary_engine.py): 'offline' (the rules of
-- pipelines/summary.py) or 'llm' (an OpenAI-compatible model, from the redacted transcript), the model
-- that answered, and, for an offline summary written because the model's answer could not be used,
-- why (a reason code and a rule or status, never the model's text).  Rows written before this
-- migration were all offline.
ALTER TABLE call_summaries
    ADD COLUMN engine   text NOT NULL DEFAULT 'offline' CHECK (engine IN ('offline', 'llm')),
    ADD COLUMN model    text CHECK (length(model) BETWEEN 1 AND 100),
    ADD COLUMN fallback text CHECK (length(fallback) <= 200),
    ADD CONSTRAINT call_summaries_engine_model CHECK ((engine = 'llm') = (model IS NOT NULL)),
    ADD CONSTRAINT call_summaries_fallback_offline CHECK (fallback IS NULL OR engine = 'offline');
