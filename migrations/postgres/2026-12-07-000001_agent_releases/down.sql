DROP TABLE artifact_chunks;
DROP TABLE agent_releases;
